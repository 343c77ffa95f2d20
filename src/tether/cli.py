"""Command line: a thin layer over the library. Options are generated from the config dataclass,
so the CLI, the YAML files and config.yaml can never disagree about a name."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn

from tether.config import TrainConfig, build_config, closest_key, field_type
from tether.errors import TetherError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line `error: ...` and exit 2, like our own errors."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            known = [
                a for action in self._actions for a in action.option_strings if a.startswith("--")
            ]
            bad = message.split(":", 1)[1].split()[0]
            message += closest_key(bad.split("=")[0], known)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="read options from YAML; the command line wins"
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        typ, _optional, choices, is_list = field_type(f)
        default = "" if f.metadata.get("required") else f" (default: {f.default})"
        help_text = f.metadata["help"] + default
        # default=None everywhere: "not given" must not override a value from --config
        if typ is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif is_list:
            parser.add_argument(
                flag,
                default=None,
                metavar="A,B",
                help=help_text,
                type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
            )
        else:
            parser.add_argument(flag, type=typ, choices=choices, default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tether", description="PPO with a leash: RLHF for causal and seq2seq LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train", help="PPO against a reward, LoRA policy, KL to the starting policy"
    )
    _add_config_options(train)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}


def cmd_train(args: argparse.Namespace) -> int:
    from tether.trainer import train

    cfg = build_config(args.config, _overrides(args))
    result = train(cfg)
    last = result.metrics[-1] if result.metrics else {}
    if last:
        print(
            f"done: {len(result.metrics)} steps, last reward_mean {last['reward_mean']:.4f}, "
            f"kl_mean {last['kl_mean']:.4f}; adapter in {result.run_dir / 'final'}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train}[args.command](args)
    except TetherError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps its last complete checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
