"""The run directory: config.yaml, metrics.jsonl, checkpoints/step-N/, final/.

Every directory is written beside its target and renamed into place, so a crash leaves either
the previous complete checkpoint or the new one, never half of one. metrics.jsonl is appended a
line at a time and fsynced, and on resume rows after the restored step are dropped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tether.errors import TetherError

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file + rename (POSIX atomic within one filesystem)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TetherError(f"cannot write {path}: {e.strerror}") from None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object a line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file tether wrote; a missing file is a run directory that is not complete."""
    if not path.is_file():
        raise TetherError(f"{path} is missing: not a complete run directory")
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with `fill(tmp)` and rename it to `target`, replacing an old one."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if target.exists():
            # rename the old one away first: a crash in between leaves it recoverable by name
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TetherError(f"cannot write {target}: {e.strerror or e}") from None


class RunDir:
    """Paths and I/O of one run; the trainer never builds a path itself."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    def prepare(self, config_yaml: str, resume: bool) -> None:
        """Create the directory; refuse to mix a new run into an old one; write config.yaml."""
        if self.root.exists() and not self.root.is_dir():
            raise TetherError(f"--out {self.root} exists and is not a directory")
        has_run = self.metrics_path.exists() or (self.root / CHECKPOINTS).exists()
        if has_run and not resume:
            raise TetherError(
                f"--out {self.root} already holds a run; pass --resume to continue it or pick a new dir"
            )
        if resume and (self.root / CONFIG).exists():
            old = (self.root / CONFIG).read_text(encoding="utf-8")
            if _without_resume(old) != _without_resume(config_yaml):
                raise TetherError(
                    f"--resume: {self.root / CONFIG} was written with a different config; "
                    "rerun with the same options or pick a new --out"
                )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TetherError(f"cannot create {self.root}: {e.strerror}") from None
        atomic_write_text(self.root / CONFIG, config_yaml)

    def prepare_eval(self, config_yaml: str) -> None:
        """An evaluation directory: never one that holds a training run."""
        if self.metrics_path.exists():
            raise TetherError(
                f"--out {self.root} holds a training run; pick a new dir for the evaluation"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TetherError(f"cannot create {self.root}: {e.strerror}") from None
        atomic_write_text(self.root / CONFIG, config_yaml)

    # --- metrics -----------------------------------------------------------------------------

    def append_metrics(self, row: dict[str, Any]) -> None:
        try:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise TetherError(f"cannot write {self.metrics_path}: {e.strerror}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash mid-write
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Keep rows with step <= last_step (the restored checkpoint), drop the rest."""
        rows = [r for r in self.read_metrics() if r.get("step", -1) <= last_step]
        write_jsonl(self.metrics_path, rows)

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(
        self,
        step: int,
        save_weights: Callable[[Path], None],
        state: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """checkpoints/step-N: weights (safetensors, via `save_weights`), trainer_state.pt and
        the config that produced them."""

        def fill(tmp: Path) -> None:
            save_weights(tmp)
            torch.save({**state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
            (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")

        target = self.root / CHECKPOINTS / f"step-{step}"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_dir(target, fill)
        return target

    def latest_checkpoint(self) -> Path | None:
        """The highest complete step-N dir; temp dirs start with '.' and never match."""
        ckpt_root = self.root / CHECKPOINTS
        if not ckpt_root.is_dir():
            return None
        steps = [
            (int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name))
        ]
        steps = [(s, p) for s, p in steps if (p / TRAINER_STATE).is_file()]
        return max(steps)[1] if steps else None

    def save_final(self, save_weights: Callable[[Path], None], config_yaml: str) -> Path:
        def fill(tmp: Path) -> None:
            save_weights(tmp)
            (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")

        atomic_dir(self.root / FINAL, fill)
        return self.root / FINAL


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer/scheduler/controller/RNG state; weights_only refuses pickled code."""
    return torch.load(checkpoint / TRAINER_STATE, weights_only=True, map_location="cpu")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _without_resume(config_yaml: str) -> str:
    """Config text minus the options that may differ between a run and its resumption."""
    return "\n".join(
        line
        for line in config_yaml.splitlines()
        if not line.startswith(("resume:", "progress:", "steps:", "report_to:"))
    )
