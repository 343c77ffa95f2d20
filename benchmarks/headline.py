"""The headline results: the detox default over several seeds, and the hacking demo's two arms.

    python benchmarks/headline.py run --seeds 0 1 2      # tether detox per seed + hacking-demo,
                                                          # then collect (about 1.5 h on 2 cores)
    python benchmarks/headline.py collect --detox RUN... --hacking DIR   # finished runs -> files
    python benchmarks/headline.py plot                    # the README's pictures (make figures)
    python benchmarks/headline.py show [--markdown]       # the tables

`collect` writes benchmarks/results/detox_seeds.json and hacking_demo.json: every change with
its paired 95% bootstrap CI as `tether compare` reads it from each run's report.json, the
guard's probes, the wall times, and the date, machine and tether version that measured them.
`plot` draws docs/img/detox_seeds.png and docs/img/hacking_demo.png from those files alone, so
the pictures change only when a result does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

from results_io import ROOT, measured_line, provenance, table

from tether.compare import change_cell, metric_change
from tether.gao import GaoFit, with_ci
from tether.hacking import FITTED, draw_fit, fit_of

RESULTS = ROOT / "benchmarks" / "results"
DETOX = RESULTS / "detox_seeds.json"
HACKING = RESULTS / "hacking_demo.json"
IMG = ROOT / "docs" / "img"
# the metrics the picture shows, in order, as tether.compare names them
METRICS = (
    ("proxy", "proxy toxicity (the reward)"),
    ("judge", "judge toxicity (HateSonar)"),
    ("perplexity", "perplexity (reference model)"),
    ("similarity", "similarity to the dialogue"),
    ("length", "completion length (tokens)"),
    ("eos", "completions ending with EOS"),
    # shown when every run has them (reports from before they existed do not)
    ("proxy_lc", "proxy, both cut to equal length"),
    ("judge_lc", "judge, both cut to equal length"),
    ("proxy_max", "proxy, expected max (EMT)"),
    ("proxy_p", "proxy, toxicity probability (TP)"),
    ("judge_max", "judge, expected max (EMT)"),
    ("judge_p", "judge, toxicity probability (TP)"),
    ("proxy_2nd", "proxy on the 2nd pool"),
    ("judge_2nd", "judge on the 2nd pool"),
    ("proxy_max_2nd", "proxy EMT, 2nd pool"),
    ("proxy_p_2nd", "proxy TP, 2nd pool"),
    ("judge_max_2nd", "judge EMT, 2nd pool"),
    ("judge_p_2nd", "judge TP, 2nd pool"),
    ("distinct_2", "distinct-2 among a prompt's samples"),
)
# the README's first table: the literature's statistics, absolute, on both pools
TAIL_ROWS = tuple(
    (f"{role}{stat}{pool}", pool_name, role_name, stat_name)
    for pool, pool_name in (("", "trained-on pool"), ("_2nd", "2nd pool"))
    for role, role_name in (("proxy", "proxy"), ("judge", "judge"))
    for stat, stat_name in (("", "mean"), ("_max", "EMT"), ("_p", "TP"))
)
# the README's second table: what the runs traded for it, as relative changes
TRADE_ROWS = ("proxy_lc", "judge_lc", "perplexity", "similarity", "length", "eos", "distinct_2")


def _finished(path: Path) -> str:
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return stamp.astimezone().isoformat(timespec="seconds")


def collect_detox(runs: list[Path], shared: tuple[Path, ...] = ()) -> dict:
    """`shared`: runs that shared the machine's cores with other work (their wall time is not
    the demo's)."""
    rows = []
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        cfg = report["config"]
        rows.append(
            {
                "run": run.name,
                "seed": cfg["seed"],
                "estimator": cfg["advantage"],
                "finished": _finished(run / "report.json"),
                "n_eval_prompts": report["n_eval_prompts"],
                "samples_per_prompt": report.get("samples_per_prompt", 1),
                "transfer": (
                    None
                    if not report.get("transfer")
                    else {k: report["transfer"][k] for k in ("prompts", "n_eval_prompts")}
                ),
                "metric_names": {
                    "proxy": report["toxicity"]["proxy"]["metric"],
                    "judge": report["toxicity"]["judge"]["metric"],
                },
                # each change and its paired CI over |baseline mean|, as `tether compare` has them
                "changes": {
                    key: change
                    for key, _ in METRICS
                    if (change := metric_change(report, key, run / "report.json")) is not None
                },
                "minutes": {k: v / 60 for k, v in report["timing_seconds"].items()},
                "alone": run.resolve() not in {p.resolve() for p in shared},
                "recipe": {
                    k: cfg[k]
                    for k in ("steps", "batch_size", "lr", "kl_coef", "lora_r", "max_new_tokens")
                },
            }
        )
    # measured when the last run finished, not when this collects them
    date = max(r["finished"] for r in rows)
    return {**provenance(), "date": date, "command": "tether detox --seed S", "runs": rows}


def collect_hacking(root: Path) -> dict:
    report = json.loads((root / "hacking_report.json").read_text())
    arms = {}
    for name, arm in report["arms"].items():
        arms[name] = {
            "kl_coef": arm["kl_coef"],
            "target_kl": arm["target_kl"],
            "lr": arm["lr"],
            "steps": arm["steps"],
            "probes": arm["guard"]["probes"],
            "flags": arm["guard"]["flag_counts"],
        }
    return {
        **provenance(),
        "date": _finished(root / "hacking_report.json"),  # when it ran, not when collected
        "command": "tether hacking-demo",
        "arms": arms,
    }


def run(seeds: list[int], out: Path) -> None:
    tether = str(Path(sys.executable).parent / "tether")
    detox_runs = []
    for seed in seeds:
        target = out / f"detox-s{seed}"
        if not (target / "report.json").is_file():
            subprocess.run([tether, "detox", "--seed", str(seed), "--out", str(target)], check=True)
        detox_runs.append(target)
    if not (out / "hacking" / "hacking_report.json").is_file():
        subprocess.run([tether, "hacking-demo", "--out", str(out / "hacking")], check=True)
    save(collect_detox(detox_runs), DETOX)
    save(collect_hacking(out / "hacking"), HACKING)


def save(record: dict, path: Path) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


# ----------------------------------------------------------------------------------------------
# tables and pictures, from the results files only
# ----------------------------------------------------------------------------------------------


def _wall(run: dict, digits: int = 1) -> str:
    shared = "" if run.get("alone", True) else " (cores shared)"
    return f"{run['minutes']['total']:.{digits}f} min{shared}"


def show(markdown: bool, only: str | None = None) -> None:
    if only != "hacking":
        show_detox(markdown)
    if only != "detox":
        show_hacking(markdown)


def show_detox(markdown: bool) -> None:
    detox = json.loads(DETOX.read_text())
    runs = sorted(detox["runs"], key=lambda r: r["seed"])
    print(measured_line(detox) + ("\n" if markdown else ""))
    headers = ("change, after vs before (paired 95% CI)", *(f"seed {r['seed']}" for r in runs))
    body = [
        (label, *(change_cell(r["changes"][key]) for r in runs))
        for key, label in METRICS
        if all(key in r["changes"] for r in runs)
    ]
    body.append(("wall time", *(_wall(r) for r in runs)))
    print(table(headers, body, markdown))
    n = runs[0]["n_eval_prompts"]
    print(f"\n(n = {n} held-out prompts; * = the CI excludes zero)\n")


def show_hacking(markdown: bool) -> None:
    hacking = json.loads(HACKING.read_text())
    print(measured_line(hacking) + ("\n" if markdown else ""))
    headers = ("arm", "step", "sqrt KL", "proxy reward", "gold judge", "perplexity", "EOS rate")
    body = [
        (
            name,
            p["step"],
            f"{p['sqrt_kl']:.2f}",
            f"{p['proxy_mean']:.3f}",
            f"{p['gold_mean']:.4f}",
            f"{p['perplexity']:.1f}",
            f"{p['eos_rate']:.2f}",
        )
        for name, arm in hacking["arms"].items()
        for p in arm["probes"]
    ]
    print(table(headers, body, markdown))
    flags = "; ".join(
        f"{name}: {', '.join(f'{k} x{v}' for k, v in arm['flags'].items()) or 'none'}"
        for name, arm in hacking["arms"].items()
    )
    print(f"\n(probe steps of 32 held-out prompts; step -1 is the starting policy; flags: {flags})")
    for name, arm in hacking["arms"].items():
        for key in FITTED:
            fit = fit_of(arm["probes"], key)
            print(f"{name}, {key.split('_')[0]} vs sqrt KL, Gao et al.'s RL form: {fit.summary()}")


README = ROOT / "README.md"


def _value(v: float) -> str:
    return f"{v:.3f}"


def _before(runs: list[dict], key: str) -> str:
    """The starting policy's value: one number, as every seed evaluates it on the same prompts
    with the same sampling seed (a range if they differ)."""
    values = sorted({round(r["changes"][key]["before_mean"], 6) for r in runs})
    return _value(values[0]) if len(values) == 1 else f"{_value(values[0])}-{_value(values[-1])}"


def _after(change: dict) -> str:
    return _value(change["after_mean"]) + ("*" if change["ci_excludes_zero"] else "")


def tail_table(runs: list[dict]) -> str | None:
    """Mean, Expected Maximum Toxicity and Toxicity Probability before and after, per seed and
    pool, as the detoxification literature reports them; None for runs without them."""
    rows = [r for r in TAIL_ROWS if all(r[0] in run["changes"] for run in runs)]
    if not any("_max" in key for key, *_ in rows):
        return None
    headers = ("pool", "toxicity", "", "before", *(f"after, seed {r['seed']}" for r in runs))
    body = [
        (pool, role, stat, _before(runs, key), *(_after(r["changes"][key]) for r in runs))
        for key, pool, role, stat in rows
    ]
    return table(headers, body, markdown=True)


def readme_block() -> str:
    """The README's generated detox part: the tail table, the picture, the trade-offs table and
    where it was measured."""
    detox = json.loads(DETOX.read_text())
    runs = sorted(detox["runs"], key=lambda r: r["seed"])
    labels = dict(METRICS)
    tail = tail_table(runs)
    trade = TRADE_ROWS if tail else tuple(key for key, _ in METRICS)
    headers = ("change after RL (95% CI)", *(f"seed {r['seed']}" for r in runs))
    body = [
        (labels[key].split(" (")[0], *(change_cell(r["changes"][key]) for r in runs))
        for key in trade
        if all(key in r["changes"] for r in runs)
    ]
    body.append(("wall time of `tether detox`", *(_wall(r, digits=0) for r in runs)))
    first = runs[0]
    pools = f"{first['n_eval_prompts']} held-out prompts of the trained-on pool" + (
        f" and {first['transfer']['n_eval_prompts']} of the 2nd ({first['transfer']['prompts']})"
        if first.get("transfer")
        else ""
    )
    k = first.get("samples_per_prompt", 1)
    lines = [
        *([tail, ""] if tail else []),
        "![the detox default over seeds: each change with its 95% CI](docs/img/detox_seeds.png)",
        "",
        table(headers, body, markdown=True),
        "",
        f"{measured_line(detox, commit=False)}; {pools}, {k} sample{'s' if k > 1 else ''} each; "
        "* = the paired 95% CI of the change excludes zero.",
    ]
    return "\n".join(lines) + "\n"


def hacking_block() -> str:
    """The README's generated hacking part: the picture and the Gao fits per arm."""
    hacking = json.loads(HACKING.read_text())
    body = []
    for name, arm in hacking["arms"].items():
        for key in FITTED:
            fit = fit_of(arm["probes"], key)
            body.append((name, key.split("_")[0], *_fit_cells(fit)))
    headers = ("arm", "score", "alpha (95% CI)", "beta (95% CI)", "peak d* (95% CI), or why none")
    return (
        "![proxy, gold and perplexity against sqrt KL, with and without the leash, with Gao et "
        "al.'s fitted curves](docs/img/hacking_demo.png)\n\n"
        + table(headers, body, markdown=True)
        + f"\n\n{measured_line(hacking, commit=False)}.\n"
    )


def _fit_cells(fit: GaoFit) -> tuple[str, str, str]:
    """alpha and beta with their intervals, and where gold peaks or why it gives no peak (the
    words of the hacking report's own summary); a fit that could not be made has only the why."""
    if fit.alpha is None:
        return (fit.verdict(), "", "")
    return (with_ci(fit.alpha, fit.alpha_ci95), with_ci(fit.beta, fit.beta_ci95), fit.verdict())


BLOCKS = {"headline": readme_block, "hacking": hacking_block}


def update_readme() -> bool:
    """Rewrite the README's generated blocks; False when they were already current."""
    text = README.read_text()
    new = text
    for name, render in BLOCKS.items():
        block = re.compile(rf"(<!-- {name}:begin[^>]*-->\n).*?(<!-- {name}:end -->)", re.S)
        if not block.search(new):
            raise SystemExit(
                f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> block"
            )
        new = block.sub(lambda m, render=render: m[1] + render() + m[2], new)
    if new != text:
        README.write_text(new)
    return new != text


def forest(record: dict, runs: list[dict], labels: list[str], title: str, path: Path) -> None:
    """Each run's change per metric, with its paired 95% CI, one colour a run (hollow: the CI
    spans 0). `record` is the results file the runs come from (its date and machine go in the
    corner)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if all(m[0] in r["changes"] for r in runs)]
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(metrics) * len(runs) ** 0.5 + 1.5))
    step = min(0.22, 0.8 / len(runs))
    offsets = [step * (i - (len(runs) - 1) / 2) for i in range(len(runs))]
    for i, (run, off, label) in enumerate(zip(runs, offsets, labels, strict=True)):
        colour = f"C{i % 10}"
        for row, (key, _) in enumerate(metrics):
            c = run["changes"][key]
            lo, hi = 100 * c["relative_ci95_low"], 100 * c["relative_ci95_high"]
            y = row + off
            ax.plot([lo, hi], [y, y], color=colour, lw=2)
            ax.plot(
                100 * c["relative_change"],
                y,
                "o",
                color=colour,
                mfc=colour if c["ci_excludes_zero"] else "white",
                label=label if row == 0 else None,
            )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(metrics)), [label for _, label in metrics])
    ax.invert_yaxis()
    ax.set_xlabel("change after RL, % of the baseline mean, with the paired 95% CI")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.text(0.01, 0.01, measured_line(record, commit=False)[:110], fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot() -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    detox = json.loads(DETOX.read_text())
    runs = sorted(detox["runs"], key=lambda r: r["seed"])
    n = runs[0]["n_eval_prompts"]
    paths = [IMG / "detox_seeds.png"]
    forest(
        detox,
        runs,
        [f"seed {run['seed']}" for run in runs],
        f"tether detox, embedded default: {len(runs)} seeds, {n} held-out prompts "
        "(hollow: the CI spans 0)",
        paths[0],
    )

    hacking = json.loads(HACKING.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in (
        (axes[0], "proxy_mean", "proxy reward (what RL optimises)"),
        (axes[1], "gold_mean", "gold judge, 1 - toxicity (what we want)"),
        (axes[2], "perplexity", "reference perplexity (fluency; lower is better)"),
    ):
        for i, (name, arm) in enumerate(hacking["arms"].items()):
            probes = arm["probes"]
            x, y = [p["sqrt_kl"] for p in probes], [p[key] for p in probes]
            fit = fit_of(probes, key) if key in FITTED else None
            if fit is not None and fit.status == "fit":  # points and the fitted curve
                ax.plot(x, y, "o", color=f"C{i}", label=name)
                draw_fit(ax, fit, y[0], max(x), f"C{i}")
            else:  # no curve the points support: the points joined
                ax.plot(x, y, "o-", color=f"C{i}", label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sqrt(KL to the starting policy)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.text(0.01, 0.01, measured_line(hacking, commit=False)[:110], fontsize=6, color="grey")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(IMG / "hacking_demo.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    for p in paths:
        print(f"wrote {p.relative_to(ROOT)}")
    if update_readme():
        print("wrote README.md (its generated blocks)")
    return paths


def add_shared_option(parser: argparse.ArgumentParser) -> None:
    """`--shared RUN...`, for the collect commands of this script and estimators.py."""
    parser.add_argument(
        "--shared",
        type=Path,
        nargs="*",
        default=[],
        metavar="RUN",
        help="runs that shared the cores with other work: their wall time is marked",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_run = sub.add_parser("run", help="run the seeds and the demo, then collect")
    p_run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_run.add_argument("--out", type=Path, default=ROOT / "runs" / "headline")
    p_col = sub.add_parser("collect", help="results files from finished runs")
    p_col.add_argument("--detox", type=Path, nargs="+", required=True, metavar="RUN")
    p_col.add_argument("--hacking", type=Path, required=True, metavar="DIR")
    add_shared_option(p_col)
    p_col.add_argument("--revision", help="the commit the runs ran at (default: this checkout's)")
    sub.add_parser("plot", help="docs/img/*.png and the README block, from the results files")
    p_show = sub.add_parser("show", help="print the tables of the results files")
    p_show.add_argument("--markdown", action="store_true")
    p_show.add_argument("--only", choices=("detox", "hacking"))
    args = parser.parse_args()
    if args.what == "run":
        run(args.seeds, args.out)
    elif args.what == "collect":
        at = {"revision": args.revision} if args.revision else {}
        save({**collect_detox(args.detox, tuple(args.shared)), **at}, DETOX)
        save({**collect_hacking(args.hacking), **at}, HACKING)
    elif args.what == "plot":
        plot()
    else:
        show(args.markdown, args.only)


if __name__ == "__main__":
    main()
