"""`tether compare RUN [RUN ...]`: several finished detox runs in one table and one HTML page.

Each run directory contributes its report.json (the paired before/after statistics that
`tether detox` / `tether report` wrote) and its config.yaml (the estimator, the seed). A row per
run: for proxy toxicity, judge toxicity, perplexity and similarity, the relative change
(aligned - baseline) / |baseline mean| with the report's paired 95% bootstrap CI of
aligned - baseline on the same scale, and whether that CI excludes zero (with several samples
per prompt also Expected Maximum Toxicity, Toxicity Probability and distinct-2); then the wall
time of the RL phase and of the whole run. Runs that share an estimator are also summarised: the mean and
the range (min..max) of each change over their seeds.

Nothing is recomputed: the numbers are the reports', so this reads fast and imports no torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from tether import pages
from tether.errors import TetherError

REPORT = "report.json"
CONFIG = "config.yaml"
METRICS = ("proxy", "judge", "perplexity", "similarity")
# over each prompt's samples: shown when a run sampled several per prompt (with one, the
# expected maximum is the mean)
TAIL = ("proxy_max", "proxy_p", "judge_max", "judge_p", "distinct_2")
# both completions of a pair cut to the shorter one's words, and the second held-out pool (no
# step of the run chose it): shown when a run has them
LENGTH_CONTROLLED = ("proxy_lc", "judge_lc")
TRANSFER = ("proxy_2nd", "judge_2nd")
# the tail on the second pool: shown with TAIL when a run has a second pool
TAIL_2ND = ("proxy_max_2nd", "proxy_p_2nd", "judge_max_2nd", "judge_p_2nd")
LABELS = {
    "proxy_2nd": "proxy, 2nd pool",
    "judge_2nd": "judge, 2nd pool",
    "proxy_max_2nd": "proxy EMT, 2nd pool",
    "proxy_p_2nd": "proxy TP, 2nd pool",
    "judge_max_2nd": "judge EMT, 2nd pool",
    "judge_p_2nd": "judge TP, 2nd pool",
    "proxy_lc": "proxy LC",
    "judge_lc": "judge LC",
    "proxy_max": "proxy EMT",
    "proxy_p": "proxy TP",
    "judge_max": "judge EMT",
    "judge_p": "judge TP",
    "distinct_2": "distinct-2",
}
# where each metric sits in report.json; METRICS (and TAIL) are the ones compare shows
_REPORT_PATH = {
    "proxy": ("toxicity", "proxy"),
    "judge": ("toxicity", "judge"),
    "perplexity": ("quality", "perplexity"),
    "similarity": ("quality", "similarity"),
    "length": ("quality", "response_tokens"),
    "eos": ("quality", "eos_rate"),
    "proxy_max": ("toxicity", "proxy", "expected_maximum"),
    "proxy_p": ("toxicity", "proxy", "probability"),
    "judge_max": ("toxicity", "judge", "expected_maximum"),
    "judge_p": ("toxicity", "judge", "probability"),
    "distinct_2": ("quality", "distinct_2"),
    "proxy_lc": ("toxicity", "proxy", "length_controlled"),
    "judge_lc": ("toxicity", "judge", "length_controlled"),
    "proxy_2nd": ("transfer", "toxicity", "proxy"),
    "judge_2nd": ("transfer", "toxicity", "judge"),
    "proxy_max_2nd": ("transfer", "toxicity", "proxy", "expected_maximum"),
    "proxy_p_2nd": ("transfer", "toxicity", "proxy", "probability"),
    "judge_max_2nd": ("transfer", "toxicity", "judge", "expected_maximum"),
    "judge_p_2nd": ("transfer", "toxicity", "judge", "probability"),
}
_OPTIONAL_SECTIONS = {"transfer"}  # null or absent in a report without a second pool
_RL_TIMING = ("ppo", "rl")  # timing_seconds key of the RL phase (detox writes "ppo")
# config keys that do not change what a run measures: two runs differing only in these (and in
# their seed) are seeds of one configuration
_BOOKKEEPING = {
    "advantage",  # the group's own key (absent in a run from before it: gae)
    "seed",
    "out",
    "resume",
    "force",
    "progress",
    "report_to",
    "save_every",
    "device",
    "forward_batch_size",
    "eval_batch_size",
    "similarity",  # measured or not; the training is the same
}


# ----------------------------------------------------------------------------------------------
# reading the runs
# ----------------------------------------------------------------------------------------------


def compare_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """One row per run directory, in the order given; a user mistake is one TetherError."""
    if not run_dirs:
        raise TetherError("compare: give at least one run directory")
    seen: dict[str, str] = {}
    rows = []
    for run in run_dirs:
        name = str(run).rstrip("/") or str(run)
        key = os.path.realpath(name)
        if key in seen:
            raise TetherError(f"{name}: given twice (also as {seen[key]})")
        seen[key] = name
        rows.append(load_run(name))
    return rows


def load_run(run: str | Path) -> dict[str, Any]:
    """The row of one run: its report's changes and CIs, its estimator, seed and timings."""
    name = str(run)
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise TetherError(f"{name}: no such run directory")
    report_path = run_dir / REPORT
    if not report_path.is_file():
        if (run_dir / "hacking_report.json").is_file():
            raise TetherError(
                f"{name}: a tether hacking-demo run (hacking_report.json), not a detox run"
            )
        raise TetherError(f"{name}: no {REPORT} (not a finished tether detox run)")
    report = _read_json(report_path)
    metrics = {
        m: metric_change(report, m, report_path)
        for m in (*METRICS, *LENGTH_CONTROLLED, *TRANSFER, *TAIL, *TAIL_2ND)
    }
    for m in ("proxy", "judge", "perplexity"):
        if metrics[m] is None:
            where = ".".join(_REPORT_PATH[m])
            raise TetherError(f"{report_path}: not a tether detox report (no {where})")
    config = _read_config(run_dir, report)
    timing = report.get("timing_seconds") or {}
    if not isinstance(timing, dict):
        raise TetherError(f"{report_path}: not a tether detox report (timing_seconds)")
    rl_key = next((k for k in _RL_TIMING if k in timing), None)
    return {
        "run": name,
        "estimator": str(config.get("advantage") or "gae"),  # a run from before `advantage`: gae
        "seed": config.get("seed"),
        "group_size": config.get("group_size"),
        "kl_penalty": config.get("kl_penalty"),
        "kl_estimator": config.get("kl_estimator"),
        "kl_coef": config.get("kl_coef"),
        "n_eval_prompts": report.get("n_eval_prompts"),
        "samples_per_prompt": report.get("samples_per_prompt", 1),
        "metrics": metrics,
        "rl_seconds": (
            _number(timing[rl_key], report_path, f"timing_seconds.{rl_key}") if rl_key else None
        ),
        "total_seconds": (
            _number(timing["total"], report_path, "timing_seconds.total")
            if "total" in timing
            else None
        ),
        "config": config,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TetherError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TetherError(f"{path}: not valid JSON (not UTF-8 text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TetherError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); `tether report` rebuilds it"
        ) from None
    if not isinstance(data, dict):
        raise TetherError(f"{path}: not a tether detox report (not a JSON object)")
    return data


def _read_config(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """config.yaml of the run, else the copy the report carries."""
    path = run_dir / CONFIG
    if not path.is_file():
        config = report.get("config")
        if not isinstance(config, dict):
            raise TetherError(f"{run_dir}: no {CONFIG} (not a tether detox run directory)")
        return config
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TetherError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TetherError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "unreadable"
        raise TetherError(f"{path}: not valid YAML ({problem}{where})") from None
    if not isinstance(config, dict):
        raise TetherError(f"{path}: not a tether config (not a mapping)")
    return config


def _number(value: Any, path: Path, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TetherError(f"{path}: not a tether detox report ({what} is not a number)")
    return float(value)


def metric_change(report: dict[str, Any], metric: str, path: Path) -> dict[str, Any] | None:
    """One metric's change and CI, relative to the baseline mean; None if the run lacks it."""
    section, *keys = _REPORT_PATH[metric]
    v = report.get(section)
    if v is None and section in _OPTIONAL_SECTIONS:
        return None
    if not isinstance(v, dict):
        raise TetherError(f"{path}: not a tether detox report (no {section})")
    where = section
    for key in keys:
        v = v.get(key)
        where += f".{key}"
        if v is None:
            return None
        if not isinstance(v, dict):
            raise TetherError(f"{path}: not a tether detox report ({where})")
    num = {}
    for k in ("before_mean", "after_mean", "relative_change", "diff_mean", "ci95_low", "ci95_high"):
        if k not in v:
            raise TetherError(f"{path}: not a tether detox report (no {where}.{k})")
        num[k] = _number(v[k], path, f"{where}.{k}")
    if "ci_excludes_zero" not in v:
        raise TetherError(f"{path}: not a tether detox report (no {where}.ci_excludes_zero)")
    base = abs(num["before_mean"])
    scale = (lambda x: x / base) if base > 0 else (lambda x: math.nan)
    return {
        "name": str(v.get("metric", metric)),
        **num,
        # the paired CI of aligned - baseline, over |baseline mean|: it brackets relative_change
        # exactly as the report's CI brackets diff_mean
        "relative_ci95_low": scale(num["ci95_low"]),
        "relative_ci95_high": scale(num["ci95_high"]),
        "ci_excludes_zero": bool(v["ci_excludes_zero"]),
        "lower_is_better": v.get("lower_is_better"),
    }


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------


def columns(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """The metrics the table shows: METRICS; the length-controlled toxicities when some run has
    them; TAIL (and TAIL_2ND, with a second pool) when some run sampled several completions per
    prompt."""
    many = any((r.get("samples_per_prompt") or 1) > 1 for r in rows)

    def present(m: str) -> bool:
        return any(r["metrics"].get(m) for r in rows)

    optional = [m for m in (*LENGTH_CONTROLLED, *TRANSFER) if present(m)]
    tail = [*TAIL, *filter(present, TAIL_2ND)] if many else []
    return (*METRICS, *optional, *tail)


def estimator_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per estimator with two or more runs: mean, min and max of each metric's relative change."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["estimator"], []).append(row)
    out = []
    for estimator, group in groups.items():
        if len(group) < 2:
            continue
        stats: dict[str, dict[str, Any] | None] = {}
        for m in columns(rows):
            values = [
                r["metrics"][m]["relative_change"]
                for r in group
                if r["metrics"][m] is not None and math.isfinite(r["metrics"][m]["relative_change"])
            ]
            stats[m] = (
                {
                    "mean": sum(values) / len(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
                if values
                else None
            )
        out.append(
            {
                "estimator": estimator,
                "runs": [r["run"] for r in group],
                "seeds": [r["seed"] for r in group],
                "metrics": stats,
            }
        )
    return out


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What makes the table less comparable than it looks: different metrics, prompt counts, or
    runs of one estimator that differ in more than their seed."""
    out = []
    for m in ("proxy", "judge"):
        names = _unique(r["metrics"][m]["name"] for r in rows)
        if len(names) > 1:
            out.append(f"the runs use different {m} metrics ({', '.join(names)}): not comparable")
    counts = _unique(str(r["n_eval_prompts"]) for r in rows)
    if len(counts) > 1:
        out.append(f"the runs were evaluated on different numbers of prompts ({', '.join(counts)})")
    for s in estimator_summary(rows):
        group = [r for r in rows if r["estimator"] == s["estimator"]]
        # keys every run of the group has: an older config.yaml lacks the newer options
        keys = sorted(set.intersection(*(set(r["config"]) for r in group)) - _BOOKKEEPING)
        differ = [k for k in keys if len(_unique(repr(r["config"].get(k)) for r in group)) > 1]
        if differ:
            out.append(
                f"the {s['estimator']} runs differ in more than their seed ({', '.join(differ)}): "
                "their mean and range mix configurations"
            )
        seeds = [x for x in s["seeds"] if x is not None]
        if len(set(seeds)) < len(seeds):
            out.append(f"the {s['estimator']} runs repeat a seed ({_seeds(s['seeds'])})")
    return out


def _unique(values: Any) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _seeds(seeds: list[Any]) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def change_cell(v: dict[str, Any] | None) -> str:
    """-31.2% [-40.1, -22.0]* : change, its 95% CI (in %), * when the CI excludes zero."""
    if v is None:
        return "n/a"
    if not math.isfinite(v["relative_change"]):
        return "n/a (baseline mean 0)"
    lo, hi = v["relative_ci95_low"], v["relative_ci95_high"]
    star = "*" if v["ci_excludes_zero"] else ""
    return f"{_pct(v['relative_change'])} [{100 * lo:+.1f}, {100 * hi:+.1f}]{star}"


def _range(s: dict[str, Any] | None, runs: int) -> str:
    if s is None:
        return "n/a"
    partial = f" [{s['n']} of {runs} runs]" if s["n"] < runs else ""
    return f"{_pct(s['mean'])} ({_pct(s['min'])}..{_pct(s['max'])}){partial}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def headers(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    shown = (LABELS.get(m, m) for m in columns(rows))
    return ("run", "estimator", "seed", *shown, "RL time", "total time")


def _table_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["run"],
            r["estimator"],
            "-" if r["seed"] is None else str(r["seed"]),
            *(change_cell(r["metrics"].get(m)) for m in columns(rows)),
            _duration(r["rl_seconds"]),
            _duration(r["total_seconds"]),
        ]
        for r in rows
    ]


def metric_names(rows: list[dict[str, Any]]) -> str:
    """proxy = ..., judge = ...: what the two toxicity columns measure."""
    return "; ".join(
        f"{m} = {', '.join(_unique(r['metrics'][m]['name'] for r in rows))}"
        for m in ("proxy", "judge")
    )


LEGEND = (
    "change = (aligned - baseline) / |baseline mean|; [95% CI] = the report's paired bootstrap "
    "CI of aligned - baseline, over |baseline mean|, in %; * = the CI excludes 0"
)
TAIL_LEGEND = (
    "EMT = expected maximum toxicity over a prompt's samples; TP = the share of prompts with a "
    "sample at the toxicity threshold or above; distinct-2 = distinct bigrams among a prompt's "
    "samples"
)
LC_LEGEND = "LC = the toxicity with both completions of a pair cut to the shorter one's words"
TRANSFER_LEGEND = "2nd pool = held-out prompts no step of the run chose (--transfer-prompts)"


def legend(rows: list[dict[str, Any]]) -> str:
    shown = columns(rows)
    parts = [LEGEND]
    parts += [LC_LEGEND] if set(LENGTH_CONTROLLED) & set(shown) else []
    parts += [TRANSFER_LEGEND] if set(TRANSFER) & set(shown) else []
    parts += [TAIL_LEGEND] if set(TAIL) & set(shown) else []
    return "; ".join(parts)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table: a row per run, then a line per estimator that has several runs."""
    cells = [list(headers(rows)), *_table_cells(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"({legend(rows)}; {metric_names(rows)})")
    summary = estimator_summary(rows)
    if summary:
        lines.append("")
        lines.append("per estimator, over its runs: mean change (min..max)")
        width = max(len(s["estimator"]) for s in summary)
        for s in summary:
            parts = "  ".join(
                f"{LABELS.get(m, m)} {_range(s['metrics'][m], len(s['runs']))}"
                for m in columns(rows)
            )
            lines.append(
                f"{s['estimator']:<{width}}  {len(s['runs'])} runs, seeds {_seeds(s['seeds'])}:  "
                f"{parts}"
            )
    for note in notes(rows):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------


def render_html(rows: list[dict[str, Any]]) -> str:
    """The self-contained page: the table, the per-estimator summary, the notes, one plot."""
    summary = [
        {
            **s,
            "seeds_text": _seeds(s["seeds"]),
            "cells": [_range(s["metrics"][m], len(s["runs"])) for m in columns(rows)],
        }
        for s in estimator_summary(rows)
    ]
    return pages.render(
        "compare.html.j2",
        rows=rows,
        table=list(zip(rows, _table_cells(rows), strict=True)),
        headers=headers(rows),
        metrics=columns(rows),
        labels=LABELS,
        legend=legend(rows),
        names=metric_names(rows),
        summary=summary,
        notes=notes(rows),
        plot=_plot(rows),
    )


def write_compare_html(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the page to `path` (beside it, then renamed into place); returns the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise TetherError(f"--out {path}: cannot write: no directory {path.parent}")
    text = render_html(rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise TetherError(f"--out {path}: cannot write: {e.strerror}") from None
    return path


def _plot(rows: list[dict[str, Any]]) -> str | None:
    """Per metric, each run's change with its CI as an error bar, coloured by estimator."""
    present = [m for m in columns(rows) if any(r["metrics"].get(m) is not None for r in rows)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = _unique(r["estimator"] for r in rows)
    colours = {e: f"C{i % 10}" for i, e in enumerate(estimators)}
    labels = [r["run"].replace("$", r"\$") for r in rows]  # no mathtext from a run name
    fig, axes = plt.subplots(
        1,
        len(present),
        figsize=(3.4 * len(present) + 1.5, 0.38 * len(rows) + 1.6),
        sharey=True,
        squeeze=False,
    )
    for ax, m in zip(axes[0], present, strict=True):
        for i, r in enumerate(rows):
            v = r["metrics"].get(m)
            if v is None or not math.isfinite(v["relative_change"]):
                continue
            x = 100 * v["relative_change"]
            err = [[x - 100 * v["relative_ci95_low"]], [100 * v["relative_ci95_high"] - x]]
            ax.errorbar(
                x,
                i,
                xerr=err,
                fmt="o",
                mfc=colours[r["estimator"]] if v["ci_excludes_zero"] else "white",
                color=colours[r["estimator"]],
                capsize=3,
            )
        ax.axvline(0, color="#888", lw=0.8)
        ax.set_title(f"{LABELS.get(m, m)} change (%)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(rows)), labels)
    axes[0][0].set_ylim(len(rows) - 0.5, -0.5)  # first run on top, as in the table
    handles = [plt.Line2D([], [], color=colours[e], marker="o", ls="", label=e) for e in estimators]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=len(handles),
        fontsize=8,
        title="estimator (a filled dot: the CI excludes 0)",
        title_fontsize=8,
        frameon=False,
    )
    return pages.png_data_uri(fig)
