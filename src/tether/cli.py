"""Command line: a thin layer over the library. Options are generated with argparse from the
command configs (tether.config) through their flat option table (tether.options), so the CLI,
the YAML files and config.yaml can never disagree about a name."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from tether.config import COMMANDS, build_config
from tether.errors import WRITE_ERRNOS, TetherError, format_cause_chain
from tether.options import Option, closest_key, commands_taking, field_type, options


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line `error: ...` and exit 2, like our own errors;
    an option of another command is refused naming the commands that take it."""

    command: str | None = None  # set on a command's parser: its name in COMMANDS

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's)
        namespace, extras = super().parse_known_args(args, namespace)
        flags = [a.split("=")[0] for a in extras if a.startswith("--")]
        if self.command and flags:
            name = flags[0][2:].replace("-", "_")
            takers = commands_taking(name, COMMANDS)
            if takers and self.command not in takers:
                takers = ", ".join(takers)
                self.error(f"{flags[0]} is not an option of {self.command} ({takers} take it)")
            self.error(f"unrecognized arguments: {' '.join(extras)}")  # with the closest match
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            known = [
                a for action in self._actions for a in action.option_strings if a.startswith("--")
            ]
            bad = message.split(":", 1)[1].split()[0]
            message += closest_key(bad.split("=")[0], known)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _add_config_options(parser: _Parser, command: str) -> None:
    """The command's options, one argparse group per option group, from its config class.
    default=SUPPRESS: an option not given is absent, so it never overrides a value from --config
    (and `none` can mean None)."""
    cls = COMMANDS[command]
    parser.command = command
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="read options from YAML; the command line wins"
    )
    parser.set_defaults(config_cls=cls)
    groups: dict[str, Any] = {}  # title -> parser.add_argument_group(title)
    for opt in options(cls):
        if opt.title not in groups:
            groups[opt.title] = parser.add_argument_group(opt.title)
        _add_option(groups[opt.title], opt)


def _add_option(group: Any, opt: Option) -> None:
    """Add `opt` to `group`, an argument group of the command's parser."""
    typ, optional, choices, is_list = field_type(opt)
    default = opt.default
    help_text = opt.help + ("" if opt.required else f" (default: {default})")
    kw: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS, "help": help_text}
    if typ is bool:
        group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
    elif is_list:
        group.add_argument(opt.flag, metavar="A,B", type=_comma_list, **kw)
    elif optional and default is not None and not choices:
        # an option that is on by default: `none` turns it off
        if "none: off" not in help_text:
            kw["help"] += "; none: off"
        group.add_argument(opt.flag, type=_or_none(typ), **kw)
    else:
        group.add_argument(opt.flag, type=typ, choices=choices, **kw)


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _or_none(typ: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its "invalid value" message
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tether", description="PPO with a leash: RLHF for causal and seq2seq LMs."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error, print its full traceback with every cause after the one-line message "
        "(may stand anywhere on the command line; or set TETHER_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train", help="PPO against a reward, LoRA policy, KL to the starting policy"
    )
    _add_config_options(train, "train")
    detox = sub.add_parser(
        "detox",
        help="baseline eval, PPO against a toxicity reward, aligned eval, report (embedded default)",
    )
    _add_config_options(detox, "detox")
    evaluate = sub.add_parser(
        "eval", help="evaluate the starting policy (and --trained ADAPTER) on held-out prompts"
    )
    _add_config_options(evaluate, "eval")
    demo = sub.add_parser(
        "hacking-demo",
        help="the same PPO job without and with the KL leash, guard on both, side-by-side report",
    )
    _add_config_options(demo, "hacking-demo")
    train_rm = sub.add_parser(
        "train-rm",
        help="train a preference (reward) model from chosen/rejected pairs; use it as pm:DIR",
    )
    _add_config_options(train_rm, "train-rm")
    cai = sub.add_parser(
        "cai", help="Constitutional AI (RLAIF): critique/revise, SL-CAI, AI feedback, PM, PPO"
    )
    stages = cai.add_subparsers(dest="stage", required=True, parser_class=_Parser)
    for name, text in (
        ("revise", "stage 1: answer red-team prompts, critique and revise under principles"),
        ("sft", "stage 2: SL-CAI, LoRA fine-tuning on the final revisions"),
        ("feedback", "stage 3: AI feedback, soft preference labels on pairs of SL-CAI answers"),
        ("train-pm", "stage 4: preference model on the AI-labelled pairs"),
        ("rl", "stage 5: RL-CAI, PPO against the preference model, leashed to SL-CAI"),
        ("eval", "stage 6: base vs SL-CAI vs RL-CAI, report.json + report.html"),
        ("run", "every stage in order, skipping finished ones, then the comparison table"),
    ):
        _add_config_options(stages.add_parser(name, help=text), "cai")
    report = sub.add_parser("report", help="rebuild report.json and report.html from a run dir")
    report.add_argument("run_dir", help="a directory written by tether detox or hacking-demo")
    compare = sub.add_parser(
        "compare",
        help="detox runs side by side (estimators, seeds): change with CI per metric, HTML page",
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN", help="directories of tether detox")
    compare.add_argument(
        "--out",
        default="compare.html",
        metavar="PATH",
        help="the self-contained HTML page (default: compare.html)",
    )
    return parser


def _config(args: argparse.Namespace) -> Any:
    cls = args.config_cls
    given = {o.name: getattr(args, o.name) for o in options(cls) if hasattr(args, o.name)}
    return build_config(cls, args.config, given)


def cmd_detox(args: argparse.Namespace) -> int:
    from tether.detox import detox
    from tether.distributed import is_main
    from tether.report import summary_table

    result = detox(_config(args))
    if not is_main():  # under `accelerate launch`, rank 0 speaks for all
        return 0
    print(summary_table(result.report))
    print(f"report: {result.run_dir / 'report.html'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tether.detox import evaluate_adapter
    from tether.distributed import is_main
    from tether.report import summary_table

    result = evaluate_adapter(_config(args))
    if not is_main():
        return 0
    if result.report is None:
        keys = [k for k in result.baseline[0] if isinstance(result.baseline[0][k], float)]
        for key in keys:
            mean = sum(r[key] for r in result.baseline) / len(result.baseline)
            print(f"{key:<34} {mean:>9.4f}")
        print(f"(n = {len(result.baseline)} held-out prompts; rows in {result.run_dir / 'eval'})")
    else:
        print(summary_table(result.report))
        print(f"report: {result.run_dir / 'report.html'}")
    return 0


def cmd_hacking_demo(args: argparse.Namespace) -> int:
    from tether.hacking import REPORT_HTML, hacking_demo, summary_table

    cfg = _config(args)
    print(summary_table(hacking_demo(cfg)))
    print(f"report: {Path(cfg.run.out) / REPORT_HTML}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tether.hacking import ARMS, REPORT_HTML, write_demo_report
    from tether.hacking import summary_table as demo_table
    from tether.report import summary_table, write_report

    run_dir = Path(args.run_dir)
    if all((run_dir / arm).is_dir() for arm in ARMS):
        print(demo_table(write_demo_report(run_dir)))
        print(f"report: {run_dir / REPORT_HTML}")
        return 0
    report = write_report(run_dir)
    print(summary_table(report))
    print(f"report: {Path(args.run_dir) / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tether.compare import compare_runs, summary_table, write_compare_html

    rows = compare_runs(args.run_dirs)
    out = write_compare_html(rows, args.out)
    print(summary_table(rows))
    print(f"report: {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tether.distributed import is_main
    from tether.trainer import train

    cfg = _config(args)
    result = train(cfg)
    last = result.metrics[-1] if result.metrics else {}
    if last and is_main():  # under `accelerate launch`, one line, not one per process
        print(
            f"done: {len(result.metrics)} steps, last reward_mean {last['reward_mean']:.4f}, "
            f"kl_mean {last['kl_mean']:.4f}; adapter in {result.run_dir / 'final'}"
        )
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    from tether.train_rm import train_reward_model

    result = train_reward_model(_config(args))

    def pct(x: float | None) -> str:
        return "n/a (no held-out pair with a preference)" if x is None else f"{x:.3f}"

    print(
        f"done: {result.n_train} training pairs, {result.n_heldout} held out; held-out pairwise "
        f"accuracy {pct(result.heldout_accuracy_before)} before, {pct(result.heldout_accuracy)} "
        f"after; reward spec pm:{result.out}"
    )
    return 0


def cmd_cai(args: argparse.Namespace) -> int:
    from tether.cai import pipeline
    from tether.cai.evaluate import summary_table

    cfg = _config(args)
    if args.stage == "run":
        report = pipeline.run_pipeline(cfg)
    else:
        summary = pipeline.run_stage(cfg, args.stage)
        if args.stage != "eval":
            print(f"{args.stage}: {summary}")
            return 0
        report = pipeline.load_report(cfg)
    print(summary_table(report))
    print(f"report: {pipeline.stage_dir(cfg, 'eval') / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TETHER_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        commands = {
            "train": cmd_train,
            "detox": cmd_detox,
            "eval": cmd_eval,
            "hacking-demo": cmd_hacking_demo,
            "report": cmd_report,
            "compare": cmd_compare,
            "train-rm": cmd_train_rm,
            "cai": cmd_cai,
        }
        return commands[args.command](args)
    except TetherError as e:
        print(f"error: {e}", file=sys.stderr)
        if debug:
            print(format_cause_chain(e), file=sys.stderr, end="")
        return 2
    except OSError as e:
        # a full disk or a read-only directory met outside the run directory's own writers
        # (which say more): still one line naming the path, never a traceback
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: cannot write {e.filename or 'a file'}: {e.strerror}", file=sys.stderr)
        if debug:
            print(format_cause_chain(e), file=sys.stderr, end="")
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps its last complete checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
