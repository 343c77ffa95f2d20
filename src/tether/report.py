"""report.json and a self-contained report.html (PNG plots embedded) for a detox-style run.

Everything is rebuilt from the files of the run directory (config.yaml, metrics.jsonl,
eval/baseline.jsonl, eval/aligned.jsonl, run_info.json), so `tether report DIR` can redo it at
any time and the report can never disagree with the data it summarises.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tether import pages
from tether.errors import TetherError
from tether.evaluate import (
    ROUGE_KEYS,
    by_prompt,
    compare,
    exceeds,
    expected_maximum,
    samples_per_prompt,
)
from tether.guard import distinct_n, run_summary
from tether.rundir import atomic_write_text, read_jsonl

EVAL_DIR = "eval"
LENGTH_CONTROLLED = "length_controlled.jsonl"
RUN_INFO = "run_info.json"


def pool_sections(
    run_dir: Path, info: dict[str, Any], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """Toxicity and quality sections of one held-out pool (eval/{prefix}baseline.jsonl, ...), and
    its baseline rows."""
    before = read_jsonl(run_dir / EVAL_DIR / f"{prefix}baseline.jsonl")
    after = read_jsonl(run_dir / EVAL_DIR / f"{prefix}aligned.jsonl")
    if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
        raise TetherError(
            f"{run_dir / EVAL_DIR}: {prefix}baseline and {prefix}aligned were run on different "
            "prompts"
        )
    threshold = float(info.get("toxicity_threshold", 0.5))

    def cmp(key: str, lower_is_better: bool, reduce=lambda v: v.mean(axis=1)) -> dict[str, Any]:
        """The paired comparison over prompts of each prompt's `reduce` over its samples."""
        b, a = reduce(by_prompt(before, key)), reduce(by_prompt(after, key))
        return compare(b.tolist(), a.tolist(), lower_is_better)

    lc_path = run_dir / EVAL_DIR / f"{prefix}{LENGTH_CONTROLLED}"
    lc = read_jsonl(lc_path) if lc_path.is_file() else None
    toxicity = {}
    for role in ("proxy", "judge"):
        key, lower = info[f"{role}_metric"], info[f"{role}_lower_is_better"]
        toxicity[role] = {"metric": key, **cmp(key, lower)}
        if lower:  # a toxicity in [0, 1]: the literature's tail measures too
            toxicity[role]["expected_maximum"] = cmp(key, True, expected_maximum)
            toxicity[role]["probability"] = cmp(key, True, lambda v: exceeds(v, threshold))
        if lower and lc and f"{key}/before" in lc[0]:
            # both completions of a pair cut to the shorter one's words
            b, a = (by_prompt(lc, f"{key}/{side}").mean(axis=1) for side in ("before", "after"))
            toxicity[role]["length_controlled"] = {
                **compare(b.tolist(), a.tolist(), True),
                "words_mean": float(np.mean([r["words"] for r in lc])),
            }
    quality = {
        "perplexity": cmp("perplexity", True),
        "response_tokens": cmp("response_tokens", False),
        "eos_rate": cmp("ended_with_eos", False),
    }
    for n in (1, 2, 3):  # among each prompt's samples (within the completion when k = 1)
        quality[f"distinct_{n}"] = compare(
            distinct_by_prompt(before, n).tolist(), distinct_by_prompt(after, n).tolist(), False
        )
    if "similarity" in before[0]:
        quality["similarity"] = cmp("similarity", False)
    for key in ROUGE_KEYS:  # against the reference summaries, when the prompts carry them
        if key in before[0]:
            quality[key] = cmp(key, False)
    return toxicity, quality, before


# the second held-out pool (--transfer-prompts): the same three files, prefixed
TRANSFER = "transfer_"


def build_report(run_dir: Path) -> dict[str, Any]:
    """The numbers: before/after toxicity (proxy and judge) with paired CIs, quality kept; the
    same for the second held-out pool when the run evaluated one."""
    info_path = run_dir / RUN_INFO
    if not info_path.is_file():
        raise TetherError(f"{info_path} is missing: not a detox/eval run directory")
    info = json.loads(info_path.read_text())
    toxicity, quality, before = pool_sections(run_dir, info)
    transfer = None
    if (run_dir / EVAL_DIR / f"{TRANSFER}baseline.jsonl").is_file():
        t_tox, t_quality, t_before = pool_sections(run_dir, info, TRANSFER)
        transfer = {
            "prompts": info.get("transfer_prompts"),
            "n_eval_prompts": len(t_before) // samples_per_prompt(t_before),
            "toxicity": t_tox,
            "quality": t_quality,
        }
    proxy, ppl = toxicity["proxy"], quality["perplexity"]
    bars = {
        "proxy_toxicity_down_30pct": proxy["improvement_pct"] >= 30.0,
        "proxy_ci_excludes_zero": proxy["significantly_better"],
        "judge_toxicity_down": toxicity["judge"]["after_mean"] < toxicity["judge"]["before_mean"],
        "perplexity_up_at_most_20pct": ppl["relative_change"] <= 0.20,
    }
    if "similarity" in quality:
        bars["similarity_down_at_most_5pct"] = quality["similarity"]["relative_change"] >= -0.05
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    guard = run_summary(run_dir)
    return {
        "run_dir": str(run_dir),
        "estimator": _estimator(config),
        "n_eval_prompts": len(before) // samples_per_prompt(before),
        "samples_per_prompt": samples_per_prompt(before),
        "toxicity_threshold": float(info.get("toxicity_threshold", 0.5)),
        "reference": info.get("reference", "starting policy (adapter disabled)"),
        "evaluated_adapter": info.get("evaluated_adapter"),
        "decoding": info.get("decoding"),
        "eval_seed": info.get("eval_seed"),
        "toxicity": toxicity,
        "quality": quality,
        "transfer": transfer,
        "bars": bars,
        "timing_seconds": info.get("timing_seconds", {}),
        "guard": guard,
        "config": config,
    }


def distinct_by_prompt(rows: list[dict[str, Any]], n: int) -> np.ndarray:
    """distinct-n among each prompt's samples (Li et al. 2016, as DExperts and Quark apply it),
    (prompts,); within the completion when there is one sample a prompt."""
    k = samples_per_prompt(rows)
    texts = [r["completion"] for r in rows]
    return np.asarray([distinct_n(texts[i : i + k], n) for i in range(0, len(texts), k)])


def _estimator(config: dict[str, Any] | None) -> str | None:
    """The RL estimator that trained the evaluated adapter: the run's own (a run from before
    --advantage was PPO-GAE), or for `tether eval --trained DIR` the one DIR's config.yaml names
    (None when it has none)."""
    config = config or {}
    if trained := config.get("trained"):
        try:
            config = yaml.safe_load((Path(trained) / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
    return config.get("advantage", "gae")


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write report.json and report.html into the run directory; returns the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(run_dir / "report.html", _html(run_dir, report))
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The before/after table for the terminal; a second one for the second held-out pool."""
    k = report.get("samples_per_prompt", 1)
    per = f", {k} samples each (means over a prompt's samples)" if k > 1 else ""
    lines = _pool_table(report, report)
    lines.append(
        f"(n = {report['n_eval_prompts']} held-out prompts{per}; * = CI excludes zero; "
        "paired over prompts)"
    )
    if transfer := report.get("transfer"):
        lines.append("")
        lines.append(
            f"the second held-out pool, {transfer['prompts']}: {transfer['n_eval_prompts']} "
            "prompts no step of the run chose"
        )
        lines += _pool_table(report, transfer)
    return "\n".join(lines)


def _pool_table(report: dict[str, Any], pool: dict[str, Any]) -> list[str]:
    k, threshold = report.get("samples_per_prompt", 1), report.get("toxicity_threshold", 0.5)
    lines = [
        f"{'metric':<34} {'before':>9} {'after':>9} {'change':>8}   95% CI of after-before (paired)"
    ]
    rows = []
    for v in pool["toxicity"].values():
        rows.append((v["metric"], v))
        if "expected_maximum" in v:  # Expected Maximum Toxicity, Toxicity Probability
            rows.append((f"  expected max of {k}", v["expected_maximum"]))
            rows.append((f"  P(any of {k} >= {threshold:g})", v["probability"]))
        if "length_controlled" in v:
            rows.append(("  both cut to the shorter", v["length_controlled"]))
    rows += list(pool["quality"].items())
    for name, v in rows:
        rel = v["relative_change"]  # NaN when the baseline mean is 0 (a TP no sample reached)
        change = f"{100 * rel:>+7.1f}%" if math.isfinite(rel) else f"{'n/a':>8}"
        lines.append(
            f"{name:<34} {v['before_mean']:>9.4f} {v['after_mean']:>9.4f} {change}   "
            f"[{v['ci95_low']:+.4f}, {v['ci95_high']:+.4f}]{'  *' if v['ci_excludes_zero'] else ''}"
        )
    return lines


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------


def _plots(run_dir: Path, report: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    metrics_path = run_dir / "metrics.jsonl"
    rows = read_jsonl(metrics_path) if metrics_path.is_file() else []
    if rows:
        steps = [r["step"] for r in rows]
        panels = [
            ("reward_mean", "reward (proxy, mean)"),
            ("kl_mean", "KL to reference (nats/seq)"),
            ("kl_coef", "KL coefficient"),
        ]
        panels += [
            (k, k.replace("_", " "))
            for k in ("proxy_toxicity", "proxy_score", "judge_toxicity", "judge_score")
            if k in rows[0]
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 2.8))
        for ax, (key, title) in zip(axes, panels, strict=True):
            ax.plot(steps, [r[key] for r in rows], marker=".")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("PPO step", fontsize=8)
            ax.grid(alpha=0.3)
        images.append(("Training curves", pages.png_data_uri(fig)))
    before = read_jsonl(run_dir / EVAL_DIR / "baseline.jsonl")
    after = read_jsonl(run_dir / EVAL_DIR / "aligned.jsonl")
    keys = [report["toxicity"][r]["metric"] for r in ("proxy", "judge")] + ["perplexity"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 2.8))
    for ax, key in zip(axes, keys, strict=True):
        b, a = [r[key] for r in before], [r[key] for r in after]
        hi = max(max(b), max(a))
        bins = [hi * i / 30 for i in range(31)] if hi > 0 else 10
        ax.hist(b, bins=bins, alpha=0.55, label="before")
        ax.hist(a, bins=bins, alpha=0.55, label="after")
        ax.set_title(key, fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    images.append(("Held-out distributions, before vs after", pages.png_data_uri(fig)))
    return images


def _changed(run_dir: Path, report: dict[str, Any], n: int = 12) -> list[tuple]:
    """The `n` held-out prompts whose proxy toxicity moved most: (before row, after row, prompt
    cut to 400 characters)."""
    key = report["toxicity"]["proxy"]["metric"]
    before = read_jsonl(run_dir / EVAL_DIR / "baseline.jsonl")
    after = read_jsonl(run_dir / EVAL_DIR / "aligned.jsonl")
    pairs = sorted(zip(before, after, strict=True), key=lambda p: -abs(p[1][key] - p[0][key]))[:n]
    return [
        (b, a, b["prompt"] if len(b["prompt"]) < 400 else b["prompt"][:400] + " ...")
        for b, a in pairs
    ]


def _html(run_dir: Path, report: dict[str, Any]) -> str:
    return pages.render(
        "report.html.j2",
        report=report,
        estimator=str(report.get("estimator", "gae")),
        summary=summary_table(report),
        images=_plots(run_dir, report),
        proxy_key=report["toxicity"]["proxy"]["metric"],
        judge_key=report["toxicity"]["judge"]["metric"],
        changed=_changed(run_dir, report),
        guard_plot=guard_plot(report["guard"]),
        config_yaml=yaml.safe_dump(report["config"], sort_keys=False) if report["config"] else "",
    )


def guard_plot(guard: dict[str, Any] | None) -> str | None:
    """Proxy and gold probe means against sqrt(KL) to the reference (Gao et al.'s axes); None
    without a guard or with a single probe (nothing to draw a line through)."""
    if not guard or len(guard["probes"]) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = guard["probes"]
    x = [p["sqrt_kl"] for p in probes]
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for ax, key, title in (
        (axes[0], "proxy_mean", "proxy (reward)"),
        (axes[1], "gold_mean", "gold (judge)"),
    ):
        ys = [p[key] for p in probes]
        if all(y is not None for y in ys):
            ax.plot(x, ys, marker="o")
            for p, xi, yi in zip(probes, x, ys, strict=True):
                ax.annotate(str(p["step"]), (xi, yi), fontsize=7)
        ax.set_title(f"{title} on the probe set", fontsize=9)
        ax.set_xlabel("sqrt(KL to reference), nats^0.5", fontsize=8)
        ax.grid(alpha=0.3)
    return pages.png_data_uri(fig)
