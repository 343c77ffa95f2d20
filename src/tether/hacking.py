"""`tether hacking-demo`: why PPO needs a leash, shown rather than told.

The same short PPO job runs twice from the same starting policy, on the same prompts, probes
and seeds: once without the KL penalty (kl_coef 0, a higher learning rate) and once with the
leash (adaptive KL). The guard watches both. The report puts them side by side: proxy reward and
gold judge against sqrt(KL), each with Gao et al.'s over-optimisation curve fitted where the probes
support one (`tether.gao`), perplexity and diversity, the n-grams that rose, example completions,
and every flag the guard raised.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from tether import distributed, pages
from tether.config import HackingDemoConfig
from tether.errors import TetherError
from tether.gao import GaoFit, fit_gao
from tether.guard import GUARD_DIR, run_summary
from tether.options import config_to_yaml
from tether.report import guard_plot
from tether.rewards import load_reward
from tether.rundir import RunDir, atomic_write_text, read_jsonl
from tether.trainer import build_policy, train

ARMS = ("no-leash", "leash")
REPORT_JSON = "hacking_report.json"
REPORT_HTML = "hacking_report.html"


def arm_configs(cfg: HackingDemoConfig) -> dict[str, HackingDemoConfig]:
    """The two arms: identical except for the leash (and the unleashed arm's learning rate)."""
    root = Path(cfg.run.out)
    return {
        "no-leash": cfg.replace(
            out=str(root / "no-leash"), kl_coef=0.0, target_kl=None, lr=cfg.unleashed_lr
        ),
        "leash": cfg.replace(out=str(root / "leash")),
    }


def hacking_demo(cfg: HackingDemoConfig) -> dict[str, Any]:
    if distributed.world_size() > 1:
        raise TetherError("hacking-demo runs in one process: launch it without accelerate launch")
    reward, judge = (
        load_reward(cfg.task.reward, cfg.model.device, **cfg.model.load_safety()),
        load_reward(cfg.task.judge, cfg.model.device, **cfg.model.load_safety()),
    )
    root = Path(cfg.run.out)
    if root.exists() and any(root.iterdir()):
        raise TetherError(f"--out {root} is not empty; pick a new dir for the demo")
    RunDir(root).prepare(config_to_yaml(cfg), resume=False)
    policy = build_policy(cfg)
    reference = None
    for name, arm in arm_configs(cfg).items():
        print(f"{name}: kl_coef {arm.kl.kl_coef}, lr {arm.rl.lr}", file=sys.stderr)
        policy.reset_adapter()  # both arms start from the same policy (LoRA A is seeded)
        train(arm, reward, policy, judge=judge, guard_reference=reference)
        reference = read_jsonl(Path(arm.run.out) / GUARD_DIR / "reference.jsonl")
    return write_demo_report(root)


def build_demo_report(root: Path) -> dict[str, Any]:
    """Side-by-side numbers, rebuilt from the two arms' run directories."""
    arms: dict[str, Any] = {}
    for name in ARMS:
        summary = run_summary(root / name)
        if summary is None:
            raise TetherError(f"{root / name}: no guard.json, not a finished demo arm")
        arm_cfg = yaml.safe_load((root / name / "config.yaml").read_text())
        reference, last = summary["probes"][0], summary["probes"][-1]
        arms[name] = {
            "advantage": arm_cfg.get("advantage", "gae"),  # runs before the estimators: PPO
            "kl_coef": arm_cfg["kl_coef"],
            "target_kl": arm_cfg["target_kl"],
            "lr": arm_cfg["lr"],
            "steps": arm_cfg["steps"],
            "reference_probe": reference,
            "last_probe": last,
            "hacking_flagged": summary["hacking_flagged"],
            "flag_counts": summary["flag_counts"],
            "fits": {key: fit_of(summary["probes"], key).as_dict() for key in FITTED},
            "guard": summary,
        }
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    return {
        "reward": cfg["reward"],
        "judge": cfg["judge"],
        "probe_prompts": cfg["probe_prompts"],
        "arms": arms,
        "verdict": {name: arms[name]["hacking_flagged"] for name in ARMS},
    }


FITTED = ("gold_mean", "proxy_mean")  # the probe scores fitted against sqrt(KL)


def fit_of(probes: list[dict[str, Any]], key: str) -> GaoFit:
    """Gao et al.'s RL form fitted to one probe score against sqrt(KL); the first probe (step -1,
    the starting policy) is the origin."""
    points = [p for p in probes[1:] if p.get(key) is not None]
    if not probes or probes[0].get(key) is None:
        return GaoFit("too few points", 0)
    return fit_gao([p["sqrt_kl"] for p in points], [p[key] for p in points], probes[0][key])


ROWS = (
    ("proxy_mean", "proxy reward (mean)"),
    ("gold_mean", "gold judge score (mean)"),
    ("kl_mean", "KL to reference (nats/seq)"),
    ("perplexity", "reference perplexity"),
    ("distinct_2", "distinct-2"),
    ("repetition", "repeated 3-grams"),
    ("response_tokens", "response tokens"),
    ("eos_rate", "EOS rate"),
)


def summary_table(report: dict[str, Any]) -> str:
    a, b = (report["arms"][n] for n in ARMS)
    lines = [
        f"reward {report['reward']}, judge {report['judge']}, "
        f"{report['probe_prompts']} held-out probe prompts",
        f"{'':<28} {'start':>9} {'no leash':>9} {'leash':>9}",
    ]
    for key, label in ROWS:
        vals = [a["reference_probe"][key], a["last_probe"][key], b["last_probe"][key]]
        lines.append(f"{label:<28} " + " ".join(f"{v:>9.4f}" for v in vals))
    for name in ARMS:
        arm = report["arms"][name]
        flags = ", ".join(f"{k} x{v}" for k, v in arm["flag_counts"].items()) or "none"
        top = ", ".join(n["ngram"] for n in arm["guard"]["rising_ngrams"][:5]) or "-"
        lines.append(
            f"{name}: {arm['advantage']}, kl_coef {arm['kl_coef']}, lr {arm['lr']}; "
            f"guard flags: {flags}; top rising n-grams: {top}"
        )
        for key in FITTED:
            if key in arm.get("fits", {}):
                fit = GaoFit(**arm["fits"][key])
                lines.append(f"  {key.split('_')[0]} vs sqrt(KL), Gao fit: {fit.summary()}")
    return "\n".join(lines)


def write_demo_report(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    report = build_demo_report(root)
    atomic_write_text(root / REPORT_JSON, json.dumps(report, indent=2))
    atomic_write_text(root / REPORT_HTML, _html(report))
    return report


def _plot(report: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for i, name in enumerate(ARMS):
        arm = report["arms"][name]
        probes = arm["guard"]["probes"]
        x = [p["sqrt_kl"] for p in probes]
        for ax, key in zip(axes, ("proxy_mean", "gold_mean", "perplexity"), strict=True):
            ys = [p[key] for p in probes]
            if key in arm.get("fits", {}) and arm["fits"][key]["status"] == "fit":
                ax.plot(x, ys, "o", color=f"C{i}", label=name)
                draw_fit(ax, GaoFit(**arm["fits"][key]), ys[0], max(x), f"C{i}")
            else:  # no fit the points support: joined points, no curve
                ax.plot(x, ys, "o-", color=f"C{i}", label=name)
    for ax, title in zip(
        axes, ("proxy reward", "gold judge score", "reference perplexity"), strict=True
    ):
        ax.set_title(f"{title} on the probe set", fontsize=9)
        ax.set_xlabel("sqrt(KL to reference)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return pages.png_data_uri(fig)


def draw_fit(ax, fit: GaoFit, y0: float, max_d: float, colour: str) -> None:
    """The fitted curve y0 + R(d) over the probed distances, its peak marked when it has one."""
    import numpy as np

    d = np.linspace(0.0, max_d, 100)
    ax.plot(d, y0 + fit.curve(d), "--", color=colour, lw=1)
    if fit.peak_d is not None and fit.peak_within_probes:
        ax.axvline(fit.peak_d, color=colour, ls=":", lw=0.8)


def _html(report: dict[str, Any]) -> str:
    return pages.render(
        "hacking.html.j2",
        summary=summary_table(report),
        plot=_plot(report),
        arms=[
            (name, report["arms"][name], guard_plot(report["arms"][name]["guard"])) for name in ARMS
        ],
    )
