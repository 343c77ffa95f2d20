"""The estimators and policy losses side by side: the detox default once each, same seed.

    python benchmarks/estimators.py run --seed 0      # tether detox per variant, then collect
                                                      # (about 20 min a variant on 2 cores)
    python benchmarks/estimators.py collect RUN...    # finished runs -> the results file
    python benchmarks/estimators.py plot              # docs/img/estimators.png
    python benchmarks/estimators.py show [--markdown] # the table

Every variant is `tether detox --seed S` with every default but the options in VARIANTS, so
each samples the same number of completions from the same prompts: 16 a step (gae one a
prompt, the critic-free estimators 4 prompts x 4). `collect` writes
benchmarks/results/estimators.json: each change with its paired 95% bootstrap CI as
`tether compare` reads it from the run's report.json, the wall times, the options that made the
variant, and the date, machine and tether version.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from headline import IMG, METRICS, RESULTS, _wall, add_shared_option, collect_detox, forest, save
from results_io import ROOT, measured_line, table

from tether.compare import change_cell

RESULTS_FILE = RESULTS / "estimators.json"
# name -> the options that make the variant; everything else is the detox default
VARIANTS = {
    "gae": [],
    "grpo": ["--advantage", "grpo"],
    "rloo": ["--advantage", "rloo"],
    "reinforce++": ["--advantage", "reinforce++"],
    "grpo + clip-higher": ["--advantage", "grpo", "--cliprange-high", "0.28"],
    "grpo + gspo": ["--advantage", "grpo", "--policy-loss", "gspo"],
    "grpo + cispo": ["--advantage", "grpo", "--policy-loss", "cispo"],
    "grpo + sapo": ["--advantage", "grpo", "--policy-loss", "sapo"],
}
# the config keys that tell the variants apart
KEYS = ("advantage", "policy_loss", "cliprange", "cliprange_high", "kl_bias_correction")


def _dir_name(name: str) -> str:
    return name.replace(" + ", "-").replace("+", "p")


def variant_of(cfg: dict) -> str:
    """The VARIANTS name a run's config matches (what it was run as), else a description."""
    label = cfg["advantage"]
    if cfg.get("policy_loss", "clip") != "clip":
        label += f" + {cfg['policy_loss']}"
    if cfg.get("cliprange_high") is not None:
        label += " + clip-higher"
    if cfg.get("kl_bias_correction"):
        label += " + corrected KL"
    return label


def collect(
    runs: list[Path], shared: tuple[Path, ...], notes: dict[str, str], revision: str | None = None
) -> dict:
    """`revision`: the commit the runs ran at, where that is not this checkout's."""
    record = collect_detox(runs, shared)
    if revision:
        record["revision"] = revision
    for row, run in zip(record["runs"], runs, strict=True):
        cfg = json.loads((run / "report.json").read_text())["config"]
        row["variant"] = variant_of(cfg)
        row["options"] = {k: cfg.get(k) for k in KEYS}
        if run.name in notes:
            row["note"] = notes[run.name]
    order = list(VARIANTS)
    record["runs"].sort(key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)
    record["command"] = "tether detox --seed S " + "{variant's options}"
    return record


def run(seed: int, out: Path) -> None:
    tether = str(Path(sys.executable).parent / "tether")
    targets = []
    for name, options in VARIANTS.items():
        target = out / f"{_dir_name(name)}-s{seed}"
        if not (target / "report.json").is_file():
            argv = [tether, "detox", "--seed", str(seed), "--out", str(target), *options]
            subprocess.run(argv, check=True)
        targets.append(target)
    save(collect(targets, (), {}), RESULTS_FILE)


def show(markdown: bool) -> None:
    record = json.loads(RESULTS_FILE.read_text())
    runs = record["runs"]
    print(measured_line(record) + ("\n" if markdown else ""))
    metrics = [m for m in METRICS[:4] if all(m[0] in r["changes"] for r in runs)]
    headers = ("variant", "seed", *(key for key, _ in metrics), "RL time", "wall time")
    body = [
        (
            r["variant"] + ("¹" if "note" in r else ""),
            r["seed"],
            *(change_cell(r["changes"][key]) for key, _ in metrics),
            f"{r['minutes']['ppo']:.1f} min",
            _wall(r),
        )
        for r in runs
    ]
    print(table(headers, body, markdown))
    n, names = runs[0]["n_eval_prompts"], runs[0]["metric_names"]
    print(
        f"\n(change after RL vs the starting policy, with its paired 95% CI; n = {n} held-out "
        f"prompts; * = the CI excludes zero; proxy: {names['proxy']}, judge: {names['judge']}; "
        "perplexity under the starting model; similarity to the dialogue)"
    )
    for r in runs:
        if "note" in r:
            print(f"\n¹ {r['variant']}: {r['note']}")


def plot() -> Path:
    record = json.loads(RESULTS_FILE.read_text())
    runs = record["runs"]
    path = IMG / "estimators.png"
    IMG.mkdir(parents=True, exist_ok=True)
    n = runs[0]["n_eval_prompts"]
    forest(
        record,
        runs,
        [r["variant"] for r in runs],
        f"tether detox, one seed ({runs[0]['seed']}) per estimator and policy loss, "
        f"{n} held-out prompts (hollow: the CI spans 0)",
        path,
    )
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p_run = sub.add_parser("run", help="run every variant on one seed, then collect")
    p_run.add_argument("--seed", type=int, default=0)
    p_run.add_argument("--out", type=Path, default=ROOT / "runs" / "estimators")
    p_col = sub.add_parser("collect", help="the results file from finished runs")
    p_col.add_argument("runs", type=Path, nargs="+", metavar="RUN")
    add_shared_option(p_col)
    p_col.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="RUN=TEXT",
        help="a footnote for one run (by its directory name), e.g. where it was run",
    )
    p_col.add_argument("--revision", help="the commit the runs ran at (default: this checkout's)")
    sub.add_parser("plot", help="docs/img/estimators.png from the results file")
    p_show = sub.add_parser("show", help="print the table of the results file")
    p_show.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.what == "run":
        run(args.seed, args.out)
    elif args.what == "collect":
        notes = dict(note.split("=", 1) for note in args.note)
        save(collect(args.runs, tuple(args.shared), notes, args.revision), RESULTS_FILE)
    elif args.what == "plot":
        plot()
    else:
        show(args.markdown)


if __name__ == "__main__":
    main()
