"""Flat option names over nested command configs: the table that the CLI (cli.py), YAML files
and the saved config.yaml share.

A command config (config.py) is a dataclass whose fields are option groups (dataclasses built by
`group`) or options of its own (`opt`). Every option has one flat name, the group's field name
(`lr` for `cfg.rl.lr`), or with the group's prefix (`rl_steps` for cai's `cfg.rl.steps`). The
flat names are the CLI flags (`--lr`), the YAML keys and the keys of config.yaml, where a prefixed
group is written as a mapping (`rl: {steps: 5}`) and every other option at the top level.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import TetherError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """An option: a dataclass field with its one-line help, which the CLI shows.
    `required=True`: no default, the command line or YAML must give it."""
    return field(default=default, metadata={"help": help, **kw})


def group(
    cls: type,
    *,
    help: dict[str, str] | None = None,
    never_none: tuple[str, ...] = (),
    prefix: str = "",
    title: str | None = None,
    **defaults: Any,
) -> Any:
    """A command's option group `cls`, built with the command's own `defaults`.

    help: the command's help for options whose meaning it changes (else the group's).
    never_none: optional options that this command requires a value for (no `none` on the CLI).
    prefix: the options' flat names are prefixed (`rl_steps`); config.yaml nests them under the
    prefix (`rl: {steps: ...}`). title: the --help section (else the group's `title`)."""
    meta = {
        "group": cls,
        "defaults": defaults,
        "help": help or {},
        "never_none": never_none,
        "prefix": prefix,
        "title": title,
    }
    return field(default_factory=functools.partial(cls, **defaults), metadata=meta)


@dataclass(frozen=True)
class Option:
    """One command-line option / YAML key of a command: `name` is flat (`lr`, `rl_steps`), `path`
    leads to its value in the config (`("rl", "lr")`, `("out",)`), `saved` to its key in
    config.yaml (`("lr",)`, `("rl", "steps")`)."""

    name: str
    path: tuple[str, ...]
    saved: tuple[str, ...]
    owner: type  # the dataclass that declares the field (its annotations give the type)
    spec: dataclasses.Field
    default: Any
    help: str
    title: str  # the --help section
    never_none: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        """No default: the command line or YAML must give it (a command may give a default)."""
        return bool(self.spec.metadata.get("required")) and self.default is None


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """Every option of a command config, in --help and config.yaml order: the command's fields
    in order, a group's options in the group's order."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "group" not in meta:
            out.append(
                Option(f.name, (f.name,), (f.name,), cls, f, f.default, meta["help"], cls.title)
            )
            continue
        sub, prefix = meta["group"], meta["prefix"]
        for g in dataclasses.fields(sub):
            out.append(
                Option(
                    name=prefix + g.name,
                    path=(f.name, g.name),
                    saved=(prefix.rstrip("_"), g.name) if prefix else (g.name,),
                    owner=sub,
                    spec=g,
                    default=meta["defaults"].get(g.name, g.default),
                    help=meta["help"].get(g.name, g.metadata["help"]),
                    title=meta["title"] or sub.title,
                    never_none=g.name in meta["never_none"],
                )
            )
    return tuple(out)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (evaluating them is the slow part of building
    the parser: once per class, not once per field)."""
    return typing.get_type_hints(cls)


def field_type(opt: Option) -> tuple[type, bool, tuple | None, bool]:
    """(scalar type, optional?, literal choices or None, is_list) of an option."""
    hint = _type_hints(opt.owner)[opt.spec.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint)) and not opt.never_none
        hint = args[0]
    is_list = typing.get_origin(hint) is list
    if is_list:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices, is_list
    return hint, optional, None, is_list


def closest_key(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the nearest known key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


# ------------------------------------------------------------------------------------------------
# flat values <-> a command config
# ------------------------------------------------------------------------------------------------


def from_flat(cls: type, values: dict[str, Any]) -> Any:
    """A command config from option values by flat name (`lr=1e-3`, `rl_steps=5`): each group
    built with the command's defaults and the given values, then the command's resolution and
    checks (its `__post_init__`). An unknown name is refused with the closest match."""
    known = {o.name: o for o in options(cls)}
    kwargs: dict[str, Any] = {}
    given: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if name not in known:
            raise TetherError(
                f"{cls.__name__}: unknown option {name!r}{closest_key(name, list(known))}"
            )
        path = known[name].path
        if len(path) == 1:
            kwargs[name] = value
        else:
            given.setdefault(path[0], {})[path[1]] = value
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            kwargs[f.name] = f.default_factory(**given.get(f.name, {}))
    return cls(**kwargs)


def flat_values(cfg: Any) -> dict[str, Any]:
    """Every option value of a config by flat name, in option order (what `from_flat` takes)."""
    out = {}
    for opt in options(type(cfg)):
        value = cfg
        for part in opt.path:
            value = getattr(value, part)
        out[opt.name] = list(value) if isinstance(value, list) else value
    return out


def config_dict(cfg: Any) -> dict[str, Any]:
    """The whole resolved config as config.yaml holds it: options in order, a prefixed group as
    a mapping under its prefix."""
    out: dict[str, Any] = {}
    values = flat_values(cfg)
    for opt in options(type(cfg)):
        *parents, leaf = opt.saved
        target = out
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = values[opt.name]
    return out


def config_to_yaml(cfg: Any) -> str:
    """The whole resolved config as YAML (what `--config` reads back)."""
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)


# ------------------------------------------------------------------------------------------------
# YAML files and the command line's values
# ------------------------------------------------------------------------------------------------


def commands_taking(name: str, commands: dict[str, type]) -> list[str]:
    """The commands that have an option `name` (flat spelling)."""
    return [cmd for cmd, cls in commands.items() if name in {o.name for o in options(cls)}]


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """Check and convert one YAML value to the option's type; errors name the key and the file."""
    name = opt.name
    typ, optional, choices, is_list = field_type(opt)
    if value is None:
        if optional or opt.default is None:  # None: unset (resolved later) or required
            return None
        raise TetherError(f"{where}: {name} may not be empty")
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TetherError(f"{where}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    try:
        if typ is bool:
            if not isinstance(value, bool):
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise TetherError(f"{where}: {name} must be {typ.__name__}, got {value!r}") from None
    if choices and value not in choices:
        raise TetherError(
            f"{where}: {name} must be one of {', '.join(map(str, choices))}; got {value!r}"
        )
    return value


def _flatten(raw: dict) -> dict[str, Any]:
    """A YAML mapping with nested groups (`rl: {steps: 5}`) as flat keys (`rl_steps`)."""
    flat = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            flat.update({f"{name}_{k}": v for k, v in _flatten(value).items()})
        else:
            flat[name] = value
    return flat


def load_yaml_config(path: str, cls: type, commands: dict[str, type]) -> dict[str, Any]:
    """Read a YAML config file into checked option values, by flat name. Keys may use '-' or
    '_'; a prefixed group may be a mapping (`rl: {steps: 5}`) or prefixed keys (`rl_steps: 5`).
    A key that another of `commands` takes is skipped (one recipe serves detox and eval), one
    that no command takes is refused with the closest match."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TetherError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TetherError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise TetherError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TetherError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    known = {o.name: o for o in options(cls)}
    values, skipped = {}, []
    for name, value in _flatten(raw).items():
        if name in known:
            values[name] = _coerce(known[name], value, path)
        elif commands_taking(name, commands):
            skipped.append(name)
        else:
            raise TetherError(f"{path}: unknown option {name!r}{closest_key(name, list(known))}")
    if skipped:
        print(
            f"note: {path}: {len(skipped)} option(s) of other tether commands skipped: "
            + ", ".join(skipped),
            file=sys.stderr,
        )
    return values


def build_config(
    cls: type, yaml_path: str | None, overrides: dict[str, Any], commands: dict[str, type]
) -> Any:
    """YAML values, then command-line overrides (the command line wins); then the command's
    resolution and checks. Values are keyed by flat name."""
    values = load_yaml_config(yaml_path, cls, commands) if yaml_path else {}
    values.update(overrides)
    missing = [o.flag for o in options(cls) if o.required and values.get(o.name) is None]
    if missing:
        raise TetherError("missing required option(s): " + ", ".join(missing))
    return from_flat(cls, values)
