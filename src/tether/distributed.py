"""Several processes under `accelerate launch`, on torch's own engines (one process: no-ops).

The launch config picks the engine (`engine()`); the policy puts itself on it
(`Policy.distribute`), and the trainer never asks which one it has:

- `ddp` (configs/accelerate/ddp.yaml): every process holds the whole policy, and the trainable
  pass (LoRA + value head) runs inside torch's `DistributedDataParallel`, which averages the
  gradients in buckets while backward is still running and skips the reduction on gradient
  accumulation micro-steps (`Policy.accumulating`);
- `fsdp2` (configs/accelerate/fsdp2.yaml, Accelerate's FSDP plugin with `fsdp_version: 2`):
  `fully_shard` on every transformer block (the model's `_no_split_modules`: Llama's decoder
  layers, T5's encoder and decoder blocks) and on the root, so each process keeps 1/N of the
  base weights at rest and all-gathers one block's for its forward; generation, the
  adapter-disabled reference pass and the update all run that way, and the LoRA and value-head
  gradients are reduce-scattered.

Whatever the engine, every process samples its own share of the prompts (`records[rank::N]`),
`batch_size` and `mini_batch_size` are per process, and a step is one process's step on the
global batch (every process's rows): the loss normalisers, the per-batch advantage whitening, the
KL controller, the running score statistics and the early stop on approx-KL all see the global
batch (the helpers below), so the adapter ends where a one-process run on the same completions
ends, up to float rounding (tests/test_distributed.py). Decisions that must not differ between
processes (the guard's verdicts, which checkpoint to resume) are rank 0's, broadcast. Only rank 0
writes the run directory: the others write to a throwaway temp dir.

Accelerate (`PartialState`) reads the launcher's environment and sets up the process group
(gloo on CPU, NCCL on GPUs) and each process's device; the collectives are `accelerate.utils`'
and `torch.distributed`'s.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import (
    broadcast_object_list,
    gather,
    pad_across_processes,
    parse_flag_from_env,
    reduce,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from tether.errors import TetherError

Engine = Literal["none", "ddp", "fsdp2"]


@lru_cache(maxsize=1)
def state() -> PartialState:
    """The launcher's process layout; a plain `python` run is one process.

    Without CUDA (or with `--cpu`) the processes talk over gloo: Accelerate only picks that
    when asked for CPU, and a GPU launch config on a machine without GPUs then still runs.
    """
    layout = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    )
    if layout.num_processes > 1:
        atexit.register(_close_process_group)
    return layout


def _close_process_group() -> None:
    """At exit: destroy the process group, then give the GIL away for a moment.

    Why: a gloo worker thread releases each finished collective's buffers itself, a beat after
    the collective completes, and when a buffer is a tensor Python made, releasing it takes the
    GIL. A thread that asks for the GIL once the interpreter has begun to finalise is torn down
    mid-destructor and the process aborts (SIGABRT, "terminate called without an active
    exception", a core dump shows `~AsyncAllgatherCoalescedWork` on `ProcessGroupGloo::runLoop`)
    after the run's work is all done: about one two-process launch in 30 here. Destroying the
    group does not join those threads (the model's DTensors and DDP still hold the backend), so
    the sleep is what lets them finish while the interpreter is whole.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    time.sleep(0.05)


def world_size() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def engine() -> Engine:
    """`fsdp2` when launched with Accelerate's FSDP plugin, `ddp` for any other multi-process
    launch, `none` in one process (whatever the config said)."""
    if world_size() == 1:
        return "none"
    return "fsdp2" if parse_flag_from_env("ACCELERATE_USE_FSDP") else "ddp"


def check_supported() -> None:
    """Launch settings tether cannot honour, refused in one line rather than run differently.

    DeepSpeed needs CUDA and its own engine around the update (see configs/accelerate/README.md).
    Of Accelerate's FSDP plugin settings tether reads the version (2: `fully_shard`) and refuses
    the two that would change what runs; it wraps per block itself whatever the auto-wrap policy
    says, and always saves full (gathered) adapters.
    """
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise TetherError(
            "launched with deepspeed: tether runs on torch's DDP or FSDP2, not DeepSpeed ZeRO; "
            "use configs/accelerate/ddp.yaml or configs/accelerate/fsdp2.yaml, see "
            "configs/accelerate/README.md"
        )
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise TetherError(
            f"launched with fsdp version {version}: tether shards with FSDP2 (fully_shard); set "
            "fsdp_version: 2 as configs/accelerate/fsdp2.yaml does (configs/accelerate/ddp.yaml "
            "for plain data parallel)"
        )
    if parse_flag_from_env("FSDP_OFFLOAD_PARAMS"):
        raise TetherError(
            "launched with fsdp_offload_params: true, which tether does not support; set it to "
            "false (configs/accelerate/fsdp2.yaml)"
        )
    if not parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True):
        raise TetherError(
            "launched with fsdp_reshard_after_forward: false; tether keeps only the shards "
            "between passes: set it to true (configs/accelerate/fsdp2.yaml)"
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


# ----------------------------------------------------------------------------------------------
# the engines (Policy.distribute puts the policy on them)
# ----------------------------------------------------------------------------------------------


def replicate(module: torch.nn.Module) -> torch.nn.parallel.DistributedDataParallel:
    """`module` under torch's DDP: its parameters that require grad (LoRA, the value head) are
    bucketed and all-reduced as backward produces them. No buffers change during training, so
    none are broadcast each forward; the inputs are on the right device already."""
    return torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)


def shard(model: torch.nn.Module, blocks: list[str] | None = None) -> torch.nn.Module:
    """FSDP2 on `model`: `fully_shard` on every module whose class is named in `blocks`, then on
    `model` itself (the root: embeddings, final norm, lm_head, the LoRA-free rest; the whole
    module when `blocks` is None, e.g. the value head).

    Every unit, the root included, frees its gathered weights after its forward, so between
    passes a process holds only its shards (and an optimiser created now sees the sharded
    parameters). `generate` counts as one forward of the root (register_fsdp_forward_method): its
    first call initialises the root, and a seq2seq model's encoder, which generate() calls on its
    own, finds the shared embedding gathered.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    names = set(blocks or ())
    wrapped = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if blocks is not None and not wrapped:
        raise TetherError(
            f"cannot shard {type(model).__name__}: none of its modules is one of {blocks} "
            "(the model's _no_split_modules); use configs/accelerate/ddp.yaml"
        )
    for block in wrapped:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    model.register_load_state_dict_pre_hook(_shard_full_tensors)
    return model


def _shard_full_tensors(module: torch.nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict of full tensors (an adapter file, a checkpoint) into a sharded module:
    each process cuts its own shard from its own copy (`src_data_rank=None`: no communication),
    so loading stays a local operation, as in one process."""
    params = dict(module.named_parameters(prefix=prefix.rstrip(".")))
    for key, value in state_dict.items():
        param = params.get(key)
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            state_dict[key] = distribute_tensor(
                value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
            )


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole on every process; any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------------------------
# agreement: the global batch's numbers, rank 0's decisions
# ----------------------------------------------------------------------------------------------


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=state().device)


def gather_floats(values: list[float]) -> list[float]:
    """Every process's `values` (equal lengths), in rank order; all processes must call it."""
    if world_size() == 1:
        return list(values)
    return gather(_tensor(values)).tolist()


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over processes (`x` itself in one process)."""
    if world_size() == 1:
        return x
    return reduce(x.to(state().device), reduction="sum").to(x.device)


def everywhere(flag: bool) -> bool:
    """True when `flag` is True on every process."""
    if world_size() == 1:
        return flag
    return bool(global_sum(_tensor([0.0 if flag else 1.0])).item() == 0)


def mean_over_processes(numbers: dict[str, Any]) -> dict[str, Any]:
    """`numbers` with every int and float value (but a `step`) averaged over processes; the
    result is the same on every process."""
    if world_size() == 1:
        return numbers
    keys = [k for k, v in numbers.items() if k != "step" and isinstance(v, int | float)]
    means = reduce(_tensor([float(numbers[k]) for k in keys]), reduction="mean").tolist()
    return {**numbers, **dict(zip(keys, means, strict=True))}


def on_global_batch(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    valid_mask: torch.Tensor,
) -> torch.Tensor:
    """`fn(x, valid_mask)` over the global batch, this process's rows of the result.

    Every process's (b, t) rows are padded to the longest t (padding is invalid) and gathered in
    rank order, `fn` runs on the (N * b, t_max) whole, as one process would on the global batch
    (per-batch whitening, REINFORCE++'s normalisation), and this process keeps its own rows.
    """
    if world_size() == 1:
        return fn(x, valid_mask)
    b, t = x.shape
    device = state().device
    xs = gather(pad_across_processes(x.to(device), dim=1))
    valid = gather(pad_across_processes(valid_mask.to(device), dim=1))
    return fn(xs, valid)[rank() * b : (rank() + 1) * b, :t].to(x.device)


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process (a decision all of them must share)."""
    if world_size() == 1:
        return obj
    return broadcast_object_list([obj], from_process=0)[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 alone (it reads rank 0's run directory), its result on every
    process; a TetherError it raises is raised on every process."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except TetherError as e:
            error = str(e)
    result, error = from_main((result, error))
    if error is not None:
        raise TetherError(error)
    return result


class SyncedKLController:
    """A KL controller fed the mean KL of all processes, counted over all their samples."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def value(self) -> float:
        return self.inner.value

    def update(self, current_kl: float, n_steps: int) -> float:
        kls = gather_floats([current_kl])
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
        everything = self.inner.normalize(gather_floats(scores))
        start = rank() * len(scores)
        return everything[start : start + len(scores)]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
