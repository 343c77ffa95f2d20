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
    block = headline.BLOCK.search(text)
    assert block, "README.md lost its generated headline block"
    assert headline.readme_block() in text, "run `make figures`: README.md is out of date"
    detox = json.loads(headline.DETOX.read_text())
    for key in ("date", "machine", "tether", "revision"):
        assert detox[key], f"{headline.DETOX} does not record its {key}"


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
