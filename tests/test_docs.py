"""The docs cannot drift from the code: every option has help and shows up in the generated
reference, the README stays a front door (short, no commit ids) whose headline table is the one
the results file gives, and the run-directory / metrics reference lists what runs write.
`make docs` builds the site itself, in strict mode, in CI."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import undocumented

from tether.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference_md import cli_markdown, option_rows  # noqa: E402


def _parsers(parser: argparse.ArgumentParser, name: str = "tether"):
    """(name, parser) for the top-level parser and every command and cai stage."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [
        f"{name}: {'/'.join(action.option_strings) or action.dest}"
        for name, p in _parsers(parser)
        for action in p._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not (action.help or "").strip()
    ]


def test_every_option_has_help():
    assert options_without_help(build_parser()) == []


def test_an_option_without_help_is_caught():
    # negative control: the check above can fail
    parser = build_parser()
    parser.add_argument("--undocumented")
    assert options_without_help(parser) == ["tether: --undocumented"]


def test_cli_reference_lists_every_option_of_every_command():
    parser = build_parser()
    page = cli_markdown(parser)
    for name, p in _parsers(parser):
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in page, f"{name} {flag} missing from the reference"
    # defaults come out of the help text into their own column
    rows = {flag: (default, text) for _, flag, default, text in option_rows(parser)}
    assert rows["`--debug`"] == ("", rows["`--debug`"][1])
    train = dict(_parsers(parser))["tether train"]
    lr = next(r for r in option_rows(train) if r[1] == "`--lr`")
    assert lr[2] == "0.0001" and "(default" not in lr[3]


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    # no commit ids: hex runs of 7+ characters with a digit and a letter
    ids = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", w)]
    ids = [w for w in ids if re.search(r"[0-9]", w)]
    assert ids == []


def test_readme_headline_is_the_results_files():
    import headline

    text = (ROOT / "README.md").read_text()
    for name, render in headline.BLOCKS.items():
        assert f"<!-- {name}:begin" in text, f"README.md lost its generated {name} block"
        assert render() in text, "run `make figures`: README.md is out of date"
    for path in (headline.DETOX, headline.HACKING):
        record = json.loads(path.read_text())
        for key in ("date", "machine", "tether", "revision"):
            assert record[key], f"{path} does not record its {key}"


def test_headline_tables_read_the_literatures_statistics_and_the_fits():
    """The README's tail table: the starting policy's value once, each seed's after value starred
    where its CI excludes zero; none for runs with one sample a prompt. A fit cell says why there
    is no peak."""
    import headline

    from tether.gao import GaoFit

    def change(before, after, star):
        return {"before_mean": before, "after_mean": after, "ci_excludes_zero": star}

    keys = [key for key, *_ in headline.TAIL_ROWS]
    runs = [
        {"seed": s, "changes": {k: change(0.5, 0.25 + s / 10, s == 0) for k in keys}}
        for s in (0, 1)
    ]
    text = headline.tail_table(runs)
    assert "| trained-on pool | judge | EMT | 0.500 | 0.250* | 0.350 |" in text
    assert "| 2nd pool | proxy | TP | 0.500 | 0.250* | 0.350 |" in text
    runs[1]["changes"]["judge_max"]["before_mean"] = 0.4  # seeds disagree on the start: a range
    assert "| trained-on pool | judge | EMT | 0.400-0.500 |" in headline.tail_table(runs)
    for run in runs:  # one sample a prompt: no EMT or TP to show
        run["changes"] = {k: v for k, v in run["changes"].items() if "_max" not in k}
    assert headline.tail_table(runs) is None
    assert headline._fit_cells(GaoFit("too few points", 2)) == (
        "cannot fit: too few points (2 probes past the start)",
        "",
        "",
    )
    rising = GaoFit("fit", 5, 1.0, -0.5, (0.8, 1.2), (-0.7, -0.3), max_d=2.0)
    assert headline._fit_cells(rising)[2] == "beta < 0: the curve bends up, no peak"
    flat = GaoFit("no turn", 5, 1.0, 0.1, (0.8, 1.2), (-0.2, 0.4), max_d=2.0)
    assert headline._fit_cells(flat) == (
        "1 [0.8, 1.2]",
        "0.1 [-0.2, 0.4]",
        "beta's interval includes 0: no turn measured",
    )
    beyond = GaoFit("fit", 5, 1.0, 0.2, (0.8, 1.2), (0.1, 0.3), 54.6, (20.1, float("inf")), False)
    assert (
        headline._fit_cells(beyond)[2]
        == "peak at sqrt(KL) 54.6 [20.1, inf] (beyond the farthest probe)"
    )


def test_undocumented_catches_new_files_and_keys(tmp_path):
    # negative control for the checks on real runs in test_cli and test_detox
    (tmp_path / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-3" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "step-3" / "surprise.bin").write_bytes(b"")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "anything.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "probe-step-4.jsonl").write_text("")
    (tmp_path / "guard" / "stray.jsonl").write_text("")
    row = {"step": 0, "new_key": 1.0, "guard": {"flags": [], "probe": {"sqrt_kl": 0, "x": 1}}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert undocumented(tmp_path) == [
        "metrics.jsonl: guard.probe.x",
        "metrics.jsonl: new_key",
        "checkpoints/step-3/surprise.bin",
        "guard/stray.jsonl",
        "notes.txt",
    ]


@pytest.mark.parametrize("page", ["metrics", "run-directory"])
def test_reference_pages_render_every_entry(page):
    from reference_md import metrics_markdown, run_directory_markdown

    from tether.rundir import RUN_LAYOUT
    from tether.trainer import METRICS_FIELDS

    if page == "metrics":
        text = metrics_markdown(METRICS_FIELDS)
        assert all(f"| `{k}` |" in text for k in METRICS_FIELDS)
    else:
        text = run_directory_markdown(RUN_LAYOUT)
        assert all(f"| `{p}` |" in text for p, _, _ in RUN_LAYOUT)
