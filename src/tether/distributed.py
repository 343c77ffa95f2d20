"""Data parallel PPO over several processes, under `accelerate launch` (one process: all no-ops).

What each process does, and what they share:

- every process holds the whole policy (base + LoRA + value head) and samples its own share of
  the prompts (`records[rank::world]`); `batch_size` and `mini_batch_size` are per process, so a
  step trains on `batch_size x processes` completions;
- gradients are averaged over processes as they accumulate (a hook on each trainable parameter),
  so gradient clipping, the non-finite check and the optimiser step all see the global gradient
  and every process takes the same step: the weights stay identical, as under DDP, without
  wrapping the model (the trainer keeps calling `policy(...)` as it always does);
- the KL controller and the running score statistics see every process's numbers; each step's
  metrics row is the mean over processes; the guard's verdict is rank 0's;
- only rank 0 writes the run directory: the others write to a throwaway temp dir.

Accelerate (`PartialState`) reads the launcher's environment and sets up the process group
(gloo on CPU, NCCL on GPUs) and each process's device.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache, lru_cache
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from tether.errors import TetherError


@lru_cache(maxsize=1)
def state() -> PartialState:
    """The launcher's process layout; a plain `python` run is one process.

    Without CUDA (or with `--cpu`) the processes talk over gloo: Accelerate only picks that
    when asked for CPU, and a GPU launch config on a machine without GPUs then still runs.
    """
    return PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    )


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def check_supported(cfg: Any) -> None:
    """Options whose per-process decisions would let the processes drift apart."""
    for engine in ("DEEPSPEED", "FSDP"):
        if parse_flag_from_env(f"ACCELERATE_USE_{engine}"):
            raise TetherError(
                f"launched with {engine.lower()}: tether trains data parallel only (each process "
                "holds the whole model); use configs/accelerate/ddp.yaml, see "
                "configs/accelerate/README.md"
            )
    n = world_size()
    if n == 1:
        return
    if cfg.resume:
        raise TetherError(f"--resume is not supported with {n} processes yet; resume in one")
    if cfg.early_stop_kl is not None:
        raise TetherError(
            f"--early-stop-kl is decided per process and would desynchronise {n} processes; "
            "drop it or run in one process"
        )


@cache
def run_root(out: str) -> str:
    """Where this process writes its run files: `out` on rank 0, a temp dir (removed at exit)
    on the others, which run the same code but must not race rank 0 for the same files. The
    same `out` always maps to the same dir (detox prepares it, then train writes into it)."""
    if is_main():
        return out
    tmp = tempfile.mkdtemp(prefix=f"tether-rank{rank()}-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average each parameter's gradient over processes every time backward adds to it.

    After micro-batch k, `.grad` holds mean(g_1..g_{k-1}) (equal on every process) plus this
    process's g_k; averaging that gives mean(g_1..g_k), so gradient accumulation stays exact.
    Every process runs the same modules, so backward reaches the parameters in the same order and
    the collectives pair up.
    """
    n = world_size()
    if n == 1:
        return

    def hook(p: torch.nn.Parameter) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)  # gloo has no AVG
        p.grad.div_(n)

    for p in params:
        if not getattr(p, "_tether_averaged", False):  # a policy trained twice keeps one hook
            p.register_post_accumulate_grad_hook(hook)
            p._tether_averaged = True


def _all_gather(values: list[float]) -> list[float]:
    """Every process's `values` (equal lengths), in rank order."""
    local = torch.tensor(values, dtype=torch.float64, device=state().device)
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return torch.cat(out).tolist()


def gather_ints(values: list[int]) -> list[int]:
    """Every process's `values` (equal lengths), in rank order; all processes must call it."""
    if world_size() == 1:
        return list(values)
    return [int(v) for v in _all_gather([float(v) for v in values])]


class SyncedKLController:
    """A KL controller fed the mean KL of all processes, counted over all their samples."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def value(self) -> float:
        return self.inner.value

    def update(self, current_kl: float, n_steps: int) -> float:
        kls = _all_gather([current_kl])
        return self.inner.update(sum(kls) / len(kls), n_steps * len(kls))

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class SyncedMoments:
    """Running score statistics over every process's scores; returns this process's share."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def normalize(self, scores: list[float]) -> list[float]:
        everything = self.inner.normalize(_all_gather(scores))
        start = rank() * len(scores)
        return everything[start : start + len(scores)]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def mean_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row with every number (but the step) averaged over processes."""
    if world_size() == 1:
        return row
    keys = [k for k, v in row.items() if k != "step" and isinstance(v, int | float)]
    gathered = _all_gather([float(row[k]) for k in keys])
    n, m = world_size(), len(keys)
    means = {k: sum(gathered[r * m + i] for r in range(n)) / n for i, k in enumerate(keys)}
    return {**row, **means}


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process (a decision all of them must share)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
