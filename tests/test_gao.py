"""tether.gao: Gao et al.'s RL over-optimisation form, fitted to probe points."""

import json

import numpy as np
import pytest

from tether.gao import fit_gao


def _points(alpha, beta, d, y0=0.5, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    d = np.asarray(d, dtype=float)
    return d.tolist(), (y0 + d * (alpha - beta * np.log(d)) + rng.normal(0, noise, d.size)).tolist()


def test_fit_recovers_alpha_beta_and_the_peak():
    alpha, beta = 0.8, 0.3  # peak at exp(0.8 / 0.3 - 1) = 5.29
    d, y = _points(alpha, beta, np.linspace(0.3, 8.0, 12))
    fit = fit_gao(d, y, y0=0.5)
    assert fit.status == "fit" and fit.n_points == 12
    assert fit.alpha == pytest.approx(alpha, abs=0.03) and fit.beta == pytest.approx(beta, abs=0.02)
    assert fit.alpha_ci95[0] < alpha < fit.alpha_ci95[1]
    assert fit.beta_ci95[0] < beta < fit.beta_ci95[1]
    assert fit.peak_d == pytest.approx(np.exp(alpha / beta - 1), rel=0.1)
    assert fit.peak_d_ci95[0] < fit.peak_d < fit.peak_d_ci95[1] and fit.peak_within_probes
    assert fit.curve(np.array([0.0, 1.0]))[0] == 0.0
    assert fit.curve(np.array([1.0]))[0] == pytest.approx(fit.alpha)  # log 1 = 0
    assert "peak at sqrt(KL) 5." in fit.summary() and "within the probes" in fit.summary()
    json.dumps(fit.as_dict(), allow_nan=False)  # a report can carry it as plain JSON


def test_a_peak_past_the_probes_is_said_to_be_so():
    d, y = _points(0.8, 0.3, np.linspace(0.3, 3.0, 10), noise=0.002)
    fit = fit_gao(d, y, y0=0.5)
    assert fit.status == "fit" and fit.peak_d > fit.max_d and not fit.peak_within_probes
    assert "beyond the farthest probe" in fit.summary()


def test_flat_points_show_no_turn_and_few_points_no_fit():
    rng = np.random.default_rng(1)
    d = np.linspace(0.5, 4.0, 8)
    fit = fit_gao(d.tolist(), (0.5 + rng.normal(0, 0.01, d.size)).tolist(), y0=0.5)
    assert fit.status == "no turn" and fit.peak_d is None
    assert fit.beta_ci95[0] < 0 < fit.beta_ci95[1]
    assert "no turn measured" in fit.summary()
    # three probes past the start (the demo's old default: two) are too few to test a bend
    few = fit_gao([0.0, 1.0, 2.0, 3.0], [0.5, 0.6, 0.65, 0.6], y0=0.5)
    assert few.status == "too few points" and few.n_points == 3 and few.alpha is None
    assert few.summary().startswith("cannot fit")
    same = fit_gao([2.0] * 5, [0.6, 0.61, 0.59, 0.6, 0.62], y0=0.5)
    assert same.status == "degenerate"


def test_a_curve_still_rising_has_no_peak():
    d, y = _points(0.2, -0.2, np.linspace(0.3, 5.0, 10), noise=0.002)
    fit = fit_gao(d, y, y0=0.5)
    assert fit.status == "fit" and fit.beta < 0 and fit.peak_d is None
    assert "bends up, no peak" in fit.summary()


def test_the_hacking_report_fits_each_arm_and_draws_only_supported_fits():
    from tether.hacking import ARMS, _plot, fit_of

    d, y = _points(0.8, 0.3, np.linspace(0.3, 8.0, 8))
    _, proxy = _points(1.0, 0.0, d, y0=1.0, seed=2)  # a straight line, with noise
    bent = [{"step": -1, "sqrt_kl": 0.0, "gold_mean": 0.5, "proxy_mean": 1.0}] + [
        {"step": i, "sqrt_kl": a, "gold_mean": b, "proxy_mean": c}
        for i, (a, b, c) in enumerate(zip(d, y, proxy, strict=True))
    ]
    assert fit_of(bent, "gold_mean").status == "fit"
    # the proxy rises in a straight line: beta = 0 within its interval, no turn
    assert fit_of(bent, "proxy_mean").status == "no turn"
    assert fit_of(bent[:3], "gold_mean").status == "too few points"
    assert fit_of([{**p, "gold_mean": None} for p in bent], "gold_mean").status == "too few points"
    report = {"arms": {}}
    for name, probes in zip(ARMS, (bent, bent[:3]), strict=True):
        for p in probes:
            p.setdefault("perplexity", 20.0)
        fits = {k: fit_of(probes, k).as_dict() for k in ("gold_mean", "proxy_mean")}
        report["arms"][name] = {"guard": {"probes": probes}, "fits": fits}
    assert _plot(report).startswith("data:image/png;base64,")
