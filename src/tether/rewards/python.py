"""A Python callable as a reward: `fn(prompts, completions) -> list[float]`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tether.errors import TetherError


@dataclass
class PythonReward:
    name: str
    fn: Callable[[list[str], list[str]], list[float]]

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.fn(prompts, completions)

    @classmethod
    def from_spec(cls, target: str) -> PythonReward:
        """`module:function` or `path/to/file.py:function`."""
        location, sep, attr = target.rpartition(":")
        if not sep or not location or not attr:
            raise TetherError(
                f"python reward {target!r}: expected module:function or file.py:function"
            )
        if location.endswith(".py"):
            path = Path(location)
            if not path.is_file():
                raise TetherError(f"python reward file not found: {location}")
            spec = importlib.util.spec_from_file_location(f"tether_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                raise TetherError(
                    f"python reward {location} failed to import: {type(e).__name__}: {e}"
                ) from None
        else:
            try:
                # the working directory is importable, as it is for `python -m`
                if "" not in sys.path:
                    sys.path.insert(0, "")
                module = importlib.import_module(location)
            except ImportError as e:
                raise TetherError(
                    f"python reward module {location!r} cannot be imported: {e}"
                ) from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise TetherError(f"python reward {location} has no callable {attr!r}")
        return cls(name=f"python:{target}", fn=fn)
