"""The reference pages, rendered from the code: every command and option from tether's own
argparse parser, metrics.jsonl's keys from `tether.trainer.METRICS_FIELDS`, the run directory
from `tether.rundir.RUN_LAYOUT`. docs/gen_pages.py writes them into the site at build time and
tests/test_docs.py checks them, so a new option or key shows up without anyone writing it down.
"""

from __future__ import annotations

import argparse
import re

# the parser's help ends "(default: X)", maybe followed by "; none: off"
_DEFAULT = re.compile(r"^(?P<help>.*)\s*\(default: (?P<default>[^()]*)\)(?P<tail>;[^()]*)?$", re.S)


def _md(text: str) -> str:
    """A table cell: pipes escaped, whitespace flattened."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("[", "\\[").replace("]", "\\]")  # [a][b] would be a reference link


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for its subparsers; sphinx-argparse reads the same field
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str]]:
    """(group title, flag as typed, default, help) for every option but --help, in order."""
    rows = []
    for group in parser._action_groups:
        for action in group._group_actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            flags = action.option_strings or [action.metavar or action.dest]
            shown = " / ".join(f"`{f}`" for f in flags)
            help_text = action.help or ""
            default = ""
            if m := _DEFAULT.match(help_text):
                help_text = m["help"].rstrip() + (m["tail"] or "")
                default = m["default"]
            if action.choices:
                help_text += "; one of " + ", ".join(f"`{c}`" for c in action.choices)
            rows.append((group.title or "", shown, default, help_text))
    return rows


def _command_section(name: str, parser: argparse.ArgumentParser, level: str) -> list[str]:
    out = []
    group_title = None
    for title, flag, default, help_text in option_rows(parser):
        if title != group_title:
            group_title = title
            out += [
                "",
                f"{level}# {title}",
                "",
                "| option | default | what |",
                "| --- | --- | --- |",
            ]
        shown = f"`{' '.join(default.split())}`" if default else ""
        out.append(f"| {flag} | {shown} | {_md(help_text)} |")
    return out


def cli_markdown(parser: argparse.ArgumentParser) -> str:
    """The whole command-line reference as one Markdown page."""
    commands = _subcommands(parser)
    lines = [
        "# Commands and options",
        "",
        "Generated from tether's own argument parser at build time: what `tether COMMAND --help` "
        "prints, as tables. Every option can also be a key of a YAML file given with `--config` "
        "(`-` or `_`, as in a run's `config.yaml`); the command line wins.",
        "",
        "| command | what |",
        "| --- | --- |",
        *(f"| [`tether {c}`](#tether-{c}) | {_md(_help_of(parser, c))} |" for c in commands),
        "",
        "## Options of every command",
    ]
    lines += _command_section("tether", parser, "##")
    for name, sub in commands.items():
        lines += ["", f"## tether {name}", "", _help_of(parser, name) + "."]
        stages = _subcommands(sub)
        if stages:
            lines += [
                "",
                f"`tether {name} STAGE [options]`; every stage takes the same options.",
                "",
                "| stage | what |",
                "| --- | --- |",
                *(f"| `{s}` | {_md(_help_of(sub, s))} |" for s in stages),
            ]
            sub = next(iter(stages.values()))
        lines += _command_section(name, sub, "###")
    return "\n".join(lines) + "\n"


def metrics_markdown(fields: dict[str, str]) -> str:
    lines = [
        "# metrics.jsonl",
        "",
        "One JSON object a line, one line a step, appended and fsynced as the run goes "
        "(a resumed run drops the rows after its checkpoint and writes them again, so every "
        "step appears once). A key shows only where it applies: the critic's with `gae`, "
        "`kl_loss` with the KL in the loss. Generated from `tether.trainer.METRICS_FIELDS`; "
        "the tests check that a run writes no key this page lacks.",
        "",
        "| key | what |",
        "| --- | --- |",
        *(f"| `{k}` | {_md(v)} |" for k, v in fields.items()),
        "",
        "With `--report-to`, the same numbers go to the tracker under the standard PPO names: "
        "`env/reward_mean`, `objective/kl`, `objective/kl_coef`, `loss/policy`, `loss/value`, "
        "`policy/approx_kl`, `policy/clipfrac`, `policy/entropy`, `val/explained_variance`, and "
        "the rest under `train/`.",
    ]
    return "\n".join(lines) + "\n"


def run_directory_markdown(layout: tuple[tuple[str, str, str], ...]) -> str:
    lines = [
        "# The run directory",
        "",
        "What `--out` holds when a run ends. Generated from `tether.rundir.RUN_LAYOUT`; the "
        "tests check that a run writes nothing this page lacks. N is a step number.",
        "",
        "Every file and directory is written under a temporary name, fsynced and renamed, so a "
        "crash never leaves half of one; `metrics.jsonl` is appended a line at a time. "
        "[Safety and recovery](../guides/safety.md) says what survives what.",
        "",
        "| path | written by | what |",
        "| --- | --- | --- |",
        *(f"| `{p}` | {_md(who)} | {_md(what)} |" for p, who, what in layout),
    ]
    return "\n".join(lines) + "\n"
