"""The run directory: config.yaml, metrics.jsonl, checkpoints/step-N/, final/.

Every directory is written beside its target, fsynced and renamed into place, so a crash (or a
`kill -9`, or a power cut) leaves either the previous complete checkpoint or the new one, never
half of one; a checkpoint also carries a completion marker listing its files and sizes, and one
without it (or whose files do not match it) is never resumed from. metrics.jsonl is appended a
line at a time and fsynced, and on resume rows after the restored step are dropped. A failed
write (full disk, read-only directory) is one TetherError naming the path; the half-built temp
dir is removed and the previous checkpoint is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from tether.errors import WRITE_ERRNOS, TetherError

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "tether-complete.json"  # a checkpoint's last file: {file name: size in bytes}
_STEP_DIR = re.compile(r"^step-(\d+)$")

# What a run directory holds, (path, commands that write it, what): the docs' reference page is
# generated from this, and the tests check that a run writes nothing it does not list. N is a
# step number; a path ending in / is a directory, whose direct children must be listed too when
# any of them is.
RUN_LAYOUT: tuple[tuple[str, str, str], ...] = (
    (CONFIG, "all", "the full resolved config, readable back with `--config`"),
    (METRICS, "all", "one JSON object a step ([fields](metrics.md))"),
    (
        f"{CHECKPOINTS}/step-N/",
        "all",
        "the checkpoint after N steps, every `--save-every` steps (all kept; the last step writes `final/` instead)",
    ),
    (f"{CHECKPOINTS}/step-N/adapter_model.safetensors", "all", "the LoRA adapter (PEFT format)"),
    (f"{CHECKPOINTS}/step-N/adapter_config.json", "all", "its PEFT config"),
    (f"{CHECKPOINTS}/step-N/value_head.safetensors", "all", "the value head (`gae` only)"),
    (
        f"{CHECKPOINTS}/step-N/{TRAINER_STATE}",
        "all",
        "optimizer, scheduler, KL controller, score statistics, skip counter, guard state and "
        "every RNG state (read with `weights_only=True`)",
    ),
    (f"{CHECKPOINTS}/step-N/best/", "all", "the guard's `best/` as it was at that step"),
    (f"{CHECKPOINTS}/step-N/{CONFIG}", "all", "the config the checkpoint was written with"),
    (f"{CHECKPOINTS}/step-N/README.md", "all", "PEFT's model card"),
    (f"{CHECKPOINTS}/step-N/{COMPLETE}", "all", "written last: every file and its size"),
    (f"{FINAL}/", "all", "the adapter (and value head) after the last step, with `config.yaml`"),
    (
        "best/",
        "all",
        "the adapter with the best gold (else proxy) probe score within the KL budget; its "
        "`best.json` names the step and the scores",
    ),
    ("guard/reference.jsonl", "all", "the starting policy's probe completions and scores"),
    ("guard/probe-step-N.jsonl", "all", "each probe's completions and scores"),
    ("guard.json", "all", "the guard's summary: probes, flags, best, how the run ended"),
    ("tensorboard/", "all", "`--report-to tensorboard`: the tracker's own files"),
    (
        "eval/baseline.jsonl",
        "detox, eval",
        "the starting policy on the held-out prompts, a row per completion",
    ),
    ("eval/aligned.jsonl", "detox, eval", "the trained policy on the same prompts and seeds"),
    (
        "eval/length_controlled.jsonl",
        "detox, eval",
        "each toxicity of both completions of a pair cut to the shorter one's words",
    ),
    (
        "eval/transfer_baseline.jsonl",
        "detox, eval",
        "`--transfer-prompts`: the starting policy on the second held-out pool",
    ),
    ("eval/transfer_aligned.jsonl", "detox, eval", "the trained policy on the second pool"),
    (
        "eval/transfer_length_controlled.jsonl",
        "detox, eval",
        "the second pool's pairs cut to the shorter one's words",
    ),
    ("run_info.json", "detox, eval", "metric names, decoding, eval seed, timings"),
    ("report.json", "detox, eval", "before/after with paired bootstrap CIs, quality, guard"),
    ("report.html", "detox, eval", "the same as one self-contained page with plots"),
    ("no-leash/", "hacking-demo", "the unleashed arm: a run directory of its own"),
    ("leash/", "hacking-demo", "the leashed arm: a run directory of its own"),
    ("hacking_report.json", "hacking-demo", "the two arms side by side"),
    (
        "hacking_report.html",
        "hacking-demo",
        "the same as one page with proxy and gold against sqrt KL",
    ),
)


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
        with contextlib.suppress(OSError):  # on a read-only filesystem even this fails (EROFS)
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
    """Build a directory with `fill(tmp)`, fsync it and rename it to `target`, replacing an old
    one. Any failure to write (OSError, or the RuntimeError torch/safetensors turn ENOSPC into)
    is one TetherError naming `target`; `target` is untouched then."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        _fsync_tree(tmp)
        if target.exists():
            # rename the old one away first: a crash in between leaves it recoverable by name
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _write_failure(e, target.parent)
        if reason is None:
            raise
        raise TetherError(f"cannot write {target}: {reason}") from None


def _write_failure(e: BaseException, where: Path) -> str | None:
    """The one-line reason when `e` is a failed write, else None (a bug: let it propagate).

    Measured on a full tmpfs: safetensors raises SafetensorError("... No space left on device"),
    torch.save a RuntimeError("[enforce fail at inline_container.cc:...] . unexpected pos ...")
    that names no errno at all; both then get the free space appended.
    """
    if isinstance(e, OSError):
        return e.strerror or str(e)
    seen = e.__cause__ or e.__context__
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    markers = ("No space left", "Read-only file system", "I/O error", "inline_container.cc")
    if not any(m in text for m in markers):
        return None
    try:
        free = f"; {shutil.disk_usage(where).free:,} bytes free there"
    except OSError:
        free = ""
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}{free}"


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` (and the dirs) to disk before the rename publishes them:
    without it a power cut can leave a renamed directory of empty files."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


def _fsync(path: Path) -> None:
    """Flush one file, or one directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    """Paths and I/O of one run; the trainer never builds a path itself."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    def prepare(self, config_yaml: str, resume: bool, force: bool = False) -> None:
        """Create the directory; refuse to mix a new run into an old one; write config.yaml.

        `--resume` into a directory written with a different config is refused (the message
        names the options that differ) unless `force`: then it continues with the new config,
        which replaces config.yaml (each checkpoint keeps the config it was written with).
        """
        self.check(config_yaml, resume, force)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TetherError(f"cannot create {self.root}: {e.strerror}") from None
        atomic_write_text(self.root / CONFIG, config_yaml)

    def check(self, config_yaml: str, resume: bool, force: bool = False) -> None:
        """prepare()'s refusals without writing anything: callers run it before loading models,
        so a mistake found later (a model path, a model type) leaves no directory behind."""
        if self.root.exists() and not self.root.is_dir():
            raise TetherError(f"--out {self.root} exists and is not a directory")
        has_run = self.metrics_path.exists() or (self.root / CHECKPOINTS).exists()
        if has_run and not resume:
            raise TetherError(
                f"--out {self.root} already holds a run; pass --resume to continue it or pick a new dir"
            )
        if resume and (self.root / CONFIG).exists():
            old = (self.root / CONFIG).read_text(encoding="utf-8")
            changed = config_changes(old, config_yaml)
            if changed and not force:
                raise TetherError(
                    f"--resume: {self.root / CONFIG} was written with a different config "
                    f"({changed}); rerun with the same options, pass --force to continue with "
                    "the new ones, or pick a new --out"
                )

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
        extra_dirs: dict[str, Path] | None = None,
    ) -> Path:
        """checkpoints/step-N: weights (safetensors, via `save_weights`), trainer_state.pt, the
        config that produced them, copies of `extra_dirs` (name -> an existing dir, e.g. the
        guard's best/) and, last, the completion marker."""

        def fill(tmp: Path) -> None:
            save_weights(tmp)
            torch.save({**state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
            (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")
            for name, src in (extra_dirs or {}).items():
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
            write_marker(tmp)

        target = self.root / CHECKPOINTS / f"step-{step}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TetherError(f"cannot create {target.parent}: {e.strerror}") from None
        atomic_dir(target, fill)
        return target

    def remove_stale_temps(self) -> list[Path]:
        """Delete what killed writers left: `.NAME.tmp-PID` dirs/files and `.NAME.old-PID` dirs
        (an old copy already replaced; every dir they could restore is rebuilt on resume).
        Call before this process writes anything."""
        stale = [
            p
            for parent in (self.root, self.root / CHECKPOINTS, self.root / "guard")
            if parent.is_dir()
            for p in parent.iterdir()
            if p.name.startswith(".") and re.search(r"\.(tmp|old)-\d+$", p.name)
        ]
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return stale

    def latest_checkpoint(self) -> Path | None:
        """The highest complete step-N dir. Temp dirs start with '.' and never match; a step-N
        dir without its completion marker, or whose files differ from it, is skipped (warned)."""
        return next(self.complete_checkpoints(), None)

    def complete_checkpoints(self) -> Iterator[Path]:
        """Complete step-N dirs, newest first (incomplete ones are warned about and skipped)."""
        ckpt_root = self.root / CHECKPOINTS
        if not ckpt_root.is_dir():
            return
        steps = sorted(
            ((int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name))),
            reverse=True,
        )
        for _step, path in steps:
            problem = checkpoint_problem(path)
            if problem is None:
                yield path
            else:
                print(f"warning: ignoring {path}: {problem}", file=sys.stderr)

    def save_final(self, save_weights: Callable[[Path], None], config_yaml: str) -> Path:
        def fill(tmp: Path) -> None:
            save_weights(tmp)
            (tmp / CONFIG).write_text(config_yaml, encoding="utf-8")

        atomic_dir(self.root / FINAL, fill)
        return self.root / FINAL


def write_marker(directory: Path) -> None:
    """The completion marker: every file under `directory` with its size, written last."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
    (directory / COMPLETE).write_text(json.dumps({"files": files}), encoding="utf-8")


def marker_problem(
    directory: Path, required: str | None = None, what: str = "directory"
) -> str | None:
    """Why `directory` (a checkpoint, the converted model cache: `what`) is not complete by its
    marker (`write_marker`: every file at its size, `required` among them), or None when it is."""
    try:
        files = json.loads((directory / COMPLETE).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {COMPLETE} (an unfinished {what})"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE}"
    if required is not None and required not in files:
        return f"{required} is not listed in {COMPLETE}"
    try:
        for name, size in files.items():
            try:
                actual = (directory / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if actual != size:
                return f"{name} has {actual} bytes, {COMPLETE} says {size}"
    except (AttributeError, TypeError):
        return f"unreadable {COMPLETE}"
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None when it is."""
    return marker_problem(directory, required=TRAINER_STATE, what="checkpoint")


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


# options that may differ between a run and its resumption without changing what it computes
_RESUME_FREE = ("resume", "force", "progress", "steps", "report_to")


def config_changes(old_yaml: str, new_yaml: str) -> str:
    """'' when two config.yaml texts agree (up to the options above), else the differing options
    as 'name old -> new, ...'. config.yaml always holds every option, so a key only in `new_yaml`
    is an option added to tether after the old run was written, and is not counted."""
    new = yaml.safe_load(new_yaml) or {}
    try:
        old = yaml.safe_load(old_yaml) or {}
    except yaml.YAMLError:
        return "the old config.yaml is not valid YAML"
    if not isinstance(old, dict):
        return "the old config.yaml is not a mapping"
    # an option missing from the old file did not exist in the tether that wrote it: not a change
    keys = [k for k in old if k not in _RESUME_FREE]
    return ", ".join(
        f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
        for k in keys
        if old.get(k) != new.get(k)
    )
