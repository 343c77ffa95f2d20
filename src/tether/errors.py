"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

import errno
import os
import sys
import sysconfig
import traceback
from pathlib import Path

from tqdm.auto import tqdm


class TetherError(Exception):
    """A mistake in the user's input (a path, a spec, a config value): never a traceback."""


# failed writes the user can fix (full disk, quota, read-only, permissions, I/O): one line, and
# never a traceback, wherever they surface
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

_TETHER = str(Path(__file__).resolve().parent)
_LIBRARIES = tuple(
    p for p in {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} if p
)


def user_frames(exc: BaseException, limit: int = 3) -> str:
    """Where the user's own code raised `exc`, for a one-line message: the innermost `limit`
    frames outside tether, the standard library and installed packages, innermost first, e.g.
    `at rewards.py:7 in score: return 1 / n; called from rewards.py:12 in f`. A callable that
    lives in an installed package counts as the user's own when no other frame does. Empty when
    there is no such frame."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TETHER)
    ]
    own = [f for f in frames if not f.filename.startswith(_LIBRARIES)] or frames
    if not own:
        return ""
    inner, *outer = [(f, f"{Path(f.filename).name}:{f.lineno} in {f.name}") for f in own[::-1]]
    text = f"at {inner[1]}" + (f": {inner[0].line}" if inner[0].line else "")
    return "; ".join([text] + [f"called from {where}" for _, where in outer[: limit - 1]])


def format_cause_chain(exc: BaseException) -> str:
    """The full traceback of `exc` with every cause and context, including those a
    `raise ... from None` hid (the CLI's --debug)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__suppress_context__ = False
        e = e.__cause__ or e.__context__
    return "".join(traceback.format_exception(exc))


def warn(msg: str) -> None:
    """A warning on stderr that does not break the progress bar."""
    tqdm.write(f"warning: {msg}", file=sys.stderr)


def env_switch(var: str, on: str = "the default", default: bool = True) -> bool:
    """An on/off environment variable that is on unless set to 0 (or false/off/no), or off
    unless set to 1 where `default` is False; any other value than those and 1/true/on/yes is
    refused with the value (`on` says what 1 means)."""
    value = os.environ.get(var, "1" if default else "0").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes"):
        return True
    raise TetherError(f"{var} must be 1 ({on}) or 0, got {value!r}")
