"""The over-optimisation curve, fitted: Gao et al.'s functional form for RL against a proxy.

Gao, Schulman and Hilton 2022 ("Scaling Laws for Reward Model Overoptimization", arXiv
2210.10760, sec. 3, the RL form) measure a policy's distance from where it started as d = sqrt(KL(pi ||
pi_init)) and find that, under RL, the gold reward gained since the start follows

    R(d) = d (alpha - beta log d),

rising while alpha - beta (1 + log d) > 0 and peaking at d* = exp(alpha / beta - 1) when beta > 0.
The proxy (the reward being optimised) follows the same form with a smaller beta. Both are linear
in (alpha, beta), so the fit is ordinary least squares; the intervals are a bootstrap over the
probe points. A fit the points cannot support is reported as such (`status`), never drawn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_POINTS = 4  # probes past the start: two parameters and something left to test them with


@dataclass(frozen=True)
class GaoFit:
    """`status`: "fit" (beta's interval excludes 0), "no turn" (it does not: the points do not
    show the curve bending), "too few points" or "degenerate" (all probes at one distance)."""

    status: str
    n_points: int
    alpha: float | None = None
    beta: float | None = None
    alpha_ci95: tuple[float, float] | None = None
    beta_ci95: tuple[float, float] | None = None
    peak_d: float | None = None  # d* = exp(alpha / beta - 1), when beta > 0
    peak_d_ci95: tuple[float, float] | None = None
    peak_within_probes: bool | None = None  # d* no further than the farthest probe
    max_d: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """For JSON: a peak interval open to the right has None as its upper end."""
        out = asdict(self)
        if self.peak_d_ci95 is not None:
            out["peak_d_ci95"] = [v if math.isfinite(v) else None for v in self.peak_d_ci95]
        return out

    def curve(self, d: np.ndarray) -> np.ndarray:
        """The fitted gain R(d) (0 at d = 0)."""
        d = np.asarray(d, dtype=float)
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, d * (self.alpha - self.beta * np.log(safe)), 0.0)

    def verdict(self) -> str:
        """Where the fitted curve peaks, or why it gives no peak to report."""
        if self.status in ("too few points", "degenerate"):
            return f"cannot fit: {self.status} ({self.n_points} probes past the start)"
        if self.status == "no turn":
            return "beta's interval includes 0: no turn measured"
        if self.peak_d is None:
            return "beta < 0: the curve bends up, no peak"
        where = "within the probes" if self.peak_within_probes else "beyond the farthest probe"
        return f"peak at sqrt(KL) {with_ci(self.peak_d, self.peak_d_ci95)} ({where})"

    def summary(self) -> str:
        """One line for a report."""
        if self.alpha is None:
            return self.verdict()
        return (
            f"alpha {with_ci(self.alpha, self.alpha_ci95)}, beta "
            f"{with_ci(self.beta, self.beta_ci95)} over {self.n_points} probes; {self.verdict()}"
        )


def with_ci(value: float, ci: tuple[float, float] | list) -> str:
    """The value and its 95% interval to 3 significant digits; an interval open to the right
    (None or inf, as a peak beyond every probe can have) ends in inf."""
    hi = f"{ci[1]:.3g}" if ci[1] is not None and math.isfinite(ci[1]) else "inf"
    return f"{value:.3g} [{ci[0]:.3g}, {hi}]"


def _lstsq(d: np.ndarray, gain: np.ndarray) -> tuple[float, float] | None:
    """(alpha, beta) of gain = alpha d - beta d log d by least squares; None if rank-deficient."""
    x = np.stack([d, -d * np.log(d)], axis=1)
    coef, _, rank, _ = np.linalg.lstsq(x, gain, rcond=None)
    return (float(coef[0]), float(coef[1])) if rank == 2 else None


def fit_gao(d: list[float], y: list[float], y0: float, n_boot: int = 2000, seed: int = 0) -> GaoFit:
    """Fit R(d) = d (alpha - beta log d) to the gains y - y0 at distances d > 0.

    Args:
        d: sqrt(KL to the starting policy) of each probe; probes at d <= 0 are left out.
        y: the probe's mean score (gold or proxy) at each d.
        y0: the starting policy's score (the probe at d = 0).
        n_boot: bootstrap resamples of the points for the 95% intervals.
    """
    pts = [(float(a), float(b) - y0) for a, b in zip(d, y, strict=True) if a > 0]
    n = len(pts)
    if n < MIN_POINTS:
        return GaoFit("too few points", n)
    dd, gain = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    point = _lstsq(dd, gain)
    if point is None or np.ptp(dd) == 0:
        return GaoFit("degenerate", n)
    alpha, beta = point
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        if np.ptp(dd[idx]) == 0:
            continue  # one distance alone fixes no curve
        if (fit := _lstsq(dd[idx], gain[idx])) is not None:
            boots.append(fit)
    if len(boots) < n_boot // 2:
        return GaoFit("degenerate", n)
    b = np.array(boots)
    a_ci = tuple(float(v) for v in np.percentile(b[:, 0], [2.5, 97.5]))
    b_ci = tuple(float(v) for v in np.percentile(b[:, 1], [2.5, 97.5]))
    max_d = float(dd.max())
    turns = b_ci[0] > 0 or b_ci[1] < 0
    peak = peak_ci = within = None
    if turns and beta > 0:
        peak = _peak(alpha, beta)
        peaks = [_peak(a, be) for a, be in boots if be > 0]
        # resamples whose beta is <= 0 never peak: count them as a peak beyond any distance
        peaks += [math.inf] * sum(1 for _, be in boots if be <= 0)
        peak_ci = tuple(float(v) for v in np.percentile(peaks, [2.5, 97.5]))
        within = peak <= max_d
    return GaoFit(
        "fit" if turns else "no turn",
        n,
        alpha,
        beta,
        a_ci,
        b_ci,
        peak,
        peak_ci,
        within,
        max_d,
    )


def _peak(alpha: float, beta: float) -> float:
    """d* = exp(alpha / beta - 1): where d (alpha - beta log d) stops rising (beta > 0)."""
    return math.exp(min(alpha / beta - 1.0, 700.0))
