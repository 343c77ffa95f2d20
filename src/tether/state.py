"""What a run keeps between steps besides the weights, and the checkpoints that carry it: the
optimiser and scheduler, the KL controller, the running score statistics, the count of skipped
mini-batches; restoring the newest checkpoint that loads on --resume."""

from __future__ import annotations

import ctypes
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm
from transformers import get_scheduler

from tether import distributed
from tether.config import TrainConfig
from tether.errors import TetherError, warn
from tether.guard import BEST
from tether.kl import KLController, make_kl_controller
from tether.policy import Policy
from tether.rundir import RunDir, atomic_dir, load_trainer_state, set_rng_state


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not Linux, or not glibc
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap memory freed by the phase that just ended back to the OS (glibc's
    malloc_trim; nothing elsewhere).

    Why: decoding, the reference pass and the update each allocate and free tensors of their own
    sizes, and glibc keeps freed memory for reuse, so the next phase's peak lands on top of the
    last phase's leftovers. Once per phase, not per micro-batch: trimming that often pays in page
    faults. `benchmarks/ppo_step.py --memory` shows how much of the peak RSS the allocator holds
    and what handing it all back costs in time.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class RunningMoments:
    """Running mean and variance of every score seen (Chan et al.'s parallel Welford update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def normalize(self, scores: list[float]) -> list[float]:
        """Fold `scores` into the statistics, then return them standardised by all seen so far."""
        n = len(scores)
        batch_mean = sum(scores) / n
        batch_m2 = sum((x - batch_mean) ** 2 for x in scores)
        total = self.count + n
        delta = batch_mean - self.mean
        # M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        std = math.sqrt(self.m2 / max(self.count - 1, 1)) or 1.0
        return [(x - self.mean) / std for x in scores]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = (
            int(state["count"]),
            float(state["mean"]),
            float(state["m2"]),
        )


REWARD_SCALE_WARNING = 10.0  # check_reward_scale: penalty / score std above this warns


class TooManySkips(Exception):
    """`max_consecutive_skips` mini-batches in a row were skipped; the trainer turns this into
    a TetherError naming the step and the last complete checkpoint."""


@dataclass
class SkipCounter:
    """Mini-batches skipped in a row, across steps (any optimiser step resets it)."""

    limit: int
    in_a_row: int = 0

    def skipped(self, reason: str) -> None:
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TooManySkips(reason)

    def stepped(self) -> None:
        self.in_a_row = 0


@dataclass
class TrainState:
    """Everything besides the weights that a resumed run needs to continue bit for bit."""

    policy: Policy  # the optimiser's parameters by name, for its state dict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: KLController
    score_moments: RunningMoments
    skips: SkipCounter
    scale_warned: bool = False  # check_reward_scale warns once a run (not saved: once a process)

    @classmethod
    def create(cls, policy: Policy, cfg: TrainConfig) -> TrainState:
        optimizer = torch.optim.AdamW(
            policy.trainable_parameters(), lr=cfg.rl.lr, weight_decay=cfg.rl.weight_decay
        )
        total_updates = (
            cfg.rl.steps * cfg.rl.ppo_epochs * (cfg.rl.batch_size // cfg.rl.mini_batch_size)
        )
        scheduler = get_scheduler(
            cfg.rl.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=total_updates
        )
        kl_ctl = make_kl_controller(cfg.kl.kl_coef, cfg.kl.target_kl, cfg.kl.kl_horizon)
        return cls(
            policy,
            optimizer,
            scheduler,
            kl_ctl,
            RunningMoments(),
            SkipCounter(cfg.rl.max_consecutive_skips),
        )

    def check_reward_scale(
        self, scores: torch.Tensor, seq_kl: torch.Tensor, kl_coef: float, cfg: TrainConfig
    ) -> None:
        """Warn once when the KL penalty in the reward dwarfs the spread of the scores the update
        sees: the advantages then mostly reward a short, reference-like completion, not a better
        one (a 0-0.05 toy reward at kl_coef 0.05 shrank completions and never rose)."""
        if self.scale_warned or cfg.kl.kl_penalty != "reward" or kl_coef == 0 or len(scores) < 2:
            return
        penalty = kl_coef * seq_kl.abs().mean().item()
        spread = scores.std().item()
        # equal scores (std 0) carry no reward signal to drown: nothing to warn about
        if spread > 0 and penalty > REWARD_SCALE_WARNING * spread:
            self.scale_warned = True
            fix = (
                "lower --kl-coef or --lr (the scores are normalised already)"
                if cfg.rl.score_norm
                else "pass --score-norm (or --kl-penalty loss, or a lower --kl-coef)"
            )
            warn(
                f"the KL penalty in the reward (mean beta x sequence KL {penalty:.3g}) is "
                f"{penalty / spread:.0f}x "
                f"the spread of the scores (std {spread:.3g}), so it drowns the reward: {fix}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": get_optimizer_state_dict(self.policy, self.optimizer, options=_FULL),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "skips_in_a_row": self.skips.in_a_row,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = _keyed_by_name(state["optimizer"], self.policy, self.optimizer)
        set_optimizer_state_dict(self.policy, self.optimizer, optimizer, options=_FULL)
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.skips.in_a_row = int(state.get("skips_in_a_row", 0))


# The optimiser's state keyed by parameter name and whole (gathered where FSDP2 shards it): the
# same file whatever the engine, so a checkpoint written by N processes resumes in one and back.
_FULL = StateDictOptions(full_state_dict=True)


def _keyed_by_name(
    saved: dict[str, Any], policy: Policy, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An optimiser state dict keyed by parameter name; one keyed by position (torch's own
    `Optimizer.state_dict()`, as tether checkpoints had it before) is renamed."""
    if all(isinstance(i, str) for g in saved["param_groups"] for i in g["params"]):
        return saved
    names = {id(p): n for n, p in policy.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {order[i]: v for i, v in saved["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }


def weights_finite(policy: Policy) -> bool:
    """No NaN/inf in the adapter or value head (cheap: only the trainable parameters), on any
    process (each looks at its shards under FSDP2; all of them must agree to save)."""
    params = policy.trainable_parameters()
    return distributed.everywhere(
        all(bool(torch.isfinite(distributed.local(p)).all()) for p in params)
    )


def restore(run: RunDir, policy: Policy, state: TrainState) -> int:
    """Load the last complete checkpoint; returns the step to continue from.

    Rank 0 picks it in its run directory (`--out`) and loads it; every other process then loads
    the same one from there (several processes share one filesystem, as on one machine).
    """
    picked = distributed.on_main(lambda: _load_latest_checkpoint(run, policy))
    if picked is None:
        run.truncate_metrics(-1)
        return 0
    ckpt = Path(picked)
    saved = load_trainer_state(ckpt)
    if not distributed.is_main():
        policy.load_trainable(ckpt)
    state.load_state_dict(saved)
    set_rng_state(saved["rng"])
    run.truncate_metrics(saved["step"])
    # the guard's best/ as it was at that step (guard.start reads it); none then, none now
    if (ckpt / BEST).is_dir():
        atomic_dir(
            run.root / BEST, lambda tmp: shutil.copytree(ckpt / BEST, tmp, dirs_exist_ok=True)
        )
    else:
        shutil.rmtree(run.root / BEST, ignore_errors=True)
    if distributed.is_main():
        tqdm.write(f"resumed from {ckpt} (step {saved['step']})", file=sys.stderr)
    return saved["step"] + 1


def _load_latest_checkpoint(run: RunDir, policy: Policy) -> str | None:
    """Load the weights of the newest checkpoint that loads into `policy`; returns its path, or
    None when there is none (start from step 0)."""
    if stale := run.remove_stale_temps():
        warn(f"--resume: removed {len(stale)} unfinished temp file(s) of the interrupted run")
    unreadable = []
    for ckpt in run.complete_checkpoints():
        try:  # the weights of an older checkpoint replace whatever a failed load left behind
            load_trainer_state(ckpt)
            policy.load_trainable(ckpt)
            return str(ckpt)
        except Exception as e:  # complete on disk yet unreadable (bit rot, a foreign write)
            unreadable.append(ckpt)
            warn(f"--resume: cannot load {ckpt} ({type(e).__name__}: {e}); trying an older one")
    if unreadable:  # the policy may hold half of one of them: do not train on from there
        raise TetherError(
            f"--resume: none of the {len(unreadable)} checkpoint(s) in {run.root} loads; "
            "start over in a new --out"
        )
    warn(f"--resume: no complete checkpoint in {run.root}; starting from step 0")
    return None
