"""Step 6 of a step: epochs x mini-batches of the clipped update (CleanRL's shape), with the
numeric guards that may skip a mini-batch and keep the processes in agreement."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tether import distributed, losses, ppo
from tether.config import TrainConfig
from tether.errors import warn
from tether.policy import Policy, PolicyOutput
from tether.rollout import Experience
from tether.state import SkipCounter


def micro_batch_size(cfg: TrainConfig, device: torch.device) -> int:
    """Completions per forward/backward in the update.

    With --gradient-accumulation-steps unset: 2 on CPU, where a mini-batch of 4 trains as fast in
    micro-batches of 2 and autograd keeps half the activations (`benchmarks/ppo_step.py --memory`
    measures both), and the whole mini-batch on an accelerator, where bigger matmuls are faster
    and memory is budgeted by the batch sizes.
    """
    if cfg.rl.gradient_accumulation_steps is None:
        return min(2, cfg.rl.mini_batch_size) if device.type == "cpu" else cfg.rl.mini_batch_size
    return cfg.rl.mini_batch_size // cfg.rl.gradient_accumulation_steps


def ppo_update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    exp: Experience,
    cfg: TrainConfig,
    generator: torch.Generator,
    skips: SkipCounter | None = None,
    kl_coef: float | None = None,
) -> dict[str, float]:
    """Epochs x shuffled mini-batches of forward, loss, backward, step (CleanRL's shape), for
    every estimator; `kl_coef` weighs the KL when it goes in the loss.

    The loss of a mini-batch is normalised over the whole mini-batch even when it is split into
    micro-batches, so gradient accumulation gives the same gradient as one big batch; with several
    processes the mini-batch is every process's share of it (`_normalisers`), whose gradient the
    engine averages once, on the last micro-batch (`policy.accumulating`). The numeric guards
    (`MiniBatchGuard`) may skip a mini-batch; `skips` counts skips in a row across calls.
    """
    micro = micro_batch_size(cfg, policy.device)
    guard = MiniBatchGuard(cfg, policy.trainable_parameters(), skips)
    stats = UpdateStats()
    for _epoch in range(cfg.rl.ppo_epochs):
        stats.epochs_run += 1
        for mb_idx in torch.randperm(len(exp), generator=generator).split(cfg.rl.mini_batch_size):
            mb = exp.select(mb_idx)
            norm = _normalisers(mb, cfg)
            optimizer.zero_grad(set_to_none=True)
            guard.start()
            mb_stats: dict[str, float] = {}
            # micro-batches of similar length pad less; the loss is a sum, so order is free
            micro_batches = mb.rollout.rows_by_length().split(micro)
            for i, micro_idx in enumerate(micro_batches):
                mu = mb.select(micro_idx)
                with policy.accumulating(last=i == len(micro_batches) - 1):
                    out, kl = _policy_pass(policy, mu, cfg)
                    loss, terms = losses.rl_loss(
                        out.logprobs,
                        mu.old_logprobs,
                        mu.advantages,
                        mu.loss_mask,
                        cfg.rl.cliprange,
                        cfg.rl.loss_aggregation,
                        kl=kl,
                        kl_coef=cfg.kl.kl_coef if kl_coef is None else kl_coef,
                        values=out.values,
                        old_values=mu.old_values,
                        returns=mu.returns,
                        cliprange_value=cfg.rl.cliprange_value,
                        vf_coef=cfg.rl.vf_coef,
                        policy_loss_kind=cfg.rl.policy_loss,
                        cliprange_high=cfg.rl.cliprange_high,
                        sapo_temperatures=(
                            cfg.rl.sapo_temperature_pos,
                            cfg.rl.sapo_temperature_neg,
                        ),
                        **norm,
                    )
                    loss = guard.check(loss, out.logprobs, mu)
                    if loss is None:
                        break
                    loss.backward()
                for k, v in terms.items():
                    mb_stats[k] = mb_stats.get(k, 0.0) + v.item()
            if not guard.allows_step():
                continue
            optimizer.step()
            scheduler.step()
            mb_stats = distributed.mean_over_processes(mb_stats)  # the global mini-batch's
            stats.add(mb_stats)
            if cfg.rl.early_stop_kl is not None and mb_stats["approx_kl"] > cfg.rl.early_stop_kl:
                stats.early_stopped = True
                break
        if stats.early_stopped:
            break
    return stats.summary(guard.skipped)


def _normalisers(mb: Experience, cfg: TrainConfig) -> dict[str, Any]:
    """The loss normalisers of a mini-batch, whatever micro-batch a token lands in.

    With N processes the mini-batch is all of theirs (N x len(mb) sequences), and the engine
    averages the N gradients: each process divides by 1/N of the global counts, so the average
    is the gradient of the global mini-batch's loss (the token count is the only one that
    differs between processes).
    """
    n = distributed.world_size()
    return {
        "n_tokens": distributed.global_sum(mb.loss_mask.sum()).clamp(min=1) / n,
        "n_sequences": len(mb),
        "max_len": cfg.sampling.max_new_tokens,
    }


def _policy_pass(
    policy: Policy, mu: Experience, cfg: TrainConfig
) -> tuple[PolicyOutput, torch.Tensor | None]:
    """The policy's forward for the loss, and the KL to the reference when it goes in the loss
    (the full KL runs the reference on the same micro-batch, adapter off, without grad; k3 with
    --kl-bias-correction is weighted by the importance ratio)."""
    full = cfg.kl.kl_penalty == "loss" and cfg.kl.kl_estimator == "full"
    out = policy(mu.rollout, with_values=cfg.rl.has_critic, with_logits=full)
    if cfg.kl.kl_penalty != "loss":
        return out, None
    if cfg.kl.kl_bias_correction:
        return out, ppo.importance_weighted_k3(out.logprobs, mu.old_logprobs, mu.ref_logprobs)
    if not full:
        return out, ppo.kl_estimate(out.logprobs, mu.ref_logprobs, cfg.kl.kl_estimator)
    with torch.no_grad(), policy.reference():
        ref_logits = policy(mu.rollout, with_values=False, with_logits=True).logits
    return out, ppo.full_kl(out.logits, ref_logits, cfg.kl.kl_chunk_size)


@dataclass
class UpdateStats:
    """Diagnostics of one update: the mean over the optimiser steps taken."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    epochs_run: int = 0
    early_stopped: bool = False

    def add(self, mb_stats: dict[str, float]) -> None:
        self.steps += 1
        for k, v in mb_stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def summary(self, skipped: dict[str, int]) -> dict[str, float]:
        keys = ("policy_loss", "clipfrac", "approx_kl", *self.sums)
        out = {k: self.sums.get(k, 0.0) / max(self.steps, 1) for k in dict.fromkeys(keys)}
        out.update(
            skipped_minibatches=skipped["nonfinite"] + skipped["ratio"],
            skipped_nonfinite=skipped["nonfinite"],
            skipped_ratio=skipped["ratio"],
            ppo_epochs_run=self.epochs_run,
            early_stopped=self.early_stopped,
        )
        return out


_SKIP_CAUSES = (None, "gradient", "loss", "ratio")  # why a mini-batch is skipped; None: it isn't


class MiniBatchGuard:
    """The numeric guards of a mini-batch, and the processes' agreement on them.

    A mini-batch whose loss or gradient is not finite (NaN/inf logits end up in both), or whose
    mean per-token ratio new/old is beyond `cfg.rl.max_importance_ratio` either way (above it or
    below its inverse), is skipped (no optimiser step) and counted; `skips` counts them in a row
    across calls and raises TooManySkips at its limit. With several processes every one goes
    through the same backward passes and they skip or step together (see `check`,
    `allows_step`).
    """

    def __init__(
        self, cfg: TrainConfig, params: list[torch.nn.Parameter], skips: SkipCounter | None
    ) -> None:
        self.params = params
        self.max_grad_norm = cfg.rl.max_grad_norm if cfg.rl.max_grad_norm > 0 else math.inf
        self.max_ratio = cfg.rl.max_importance_ratio
        ratio = cfg.rl.max_importance_ratio
        self.max_log_ratio = math.log(ratio) if ratio is not None else math.inf
        self.skips = skips
        self.n_procs = distributed.world_size()
        self.skipped = {"nonfinite": 0, "ratio": 0}
        self.bad: str | None = None  # why this mini-batch is skipped: "loss", "ratio", "gradient"

    def start(self) -> None:
        self.bad = None

    def check(
        self, loss: torch.Tensor, logprobs: torch.Tensor, mu: Experience
    ) -> torch.Tensor | None:
        """The micro-batch's loss to backpropagate, or None: stop this mini-batch here."""
        with torch.no_grad():
            # E_old[r] = 1 for r = pi_new / pi_old on tokens sampled from pi_old: a mean ratio
            # far from 1 is a broken batch (one exploding token is enough), while a few
            # moderately large per-token ratios are PPO's clipping's business
            ratio = torch.exp(logprobs - mu.old_logprobs)
            mean_ratio = ppo.masked_mean(ratio, mu.rollout.valid_mask).item()
        if self.bad is None and not torch.isfinite(loss):
            self.bad = "loss"
        elif self.bad is None and abs(math.log(max(mean_ratio, 1e-300))) > self.max_log_ratio:
            self.bad = "ratio"
        if self.bad is None:
            return loss
        if self.n_procs == 1:
            return None
        # the other processes wait for this one in the gradient reduction (and, sharded, in every
        # block's all-gather): go on through backward with the loss zeroed; allows_step then
        # skips the mini-batch on every process. (A NaN loss does not make every gradient NaN:
        # the backward of clamp and max routes NaN only into the branch taken.)
        return loss * 0.0

    def allows_step(self) -> bool:
        """Clip the gradient and decide whether the optimiser may step (False: skipped)."""
        if self.bad is None or self.n_procs > 1:
            # the norm is inf/NaN as soon as one gradient entry is (cheap: LoRA + value head);
            # gradients are averaged over processes, so all of them decide alike here (sharded,
            # the norm is of the whole gradient: a DTensor, gathered to a number)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            if not torch.isfinite(distributed.full(grad_norm)):
                self.bad = self.bad or "gradient"
        if self.n_procs > 1:
            # skip on every process if any saw a cause, named as the first process that saw one
            # in its own micro-batches did (else a non-finite gradient), so the counts agree
            codes = [int(c) for c in distributed.gather_floats([_SKIP_CAUSES.index(self.bad)])]
            seen = [c for c in codes if c >= 2] or [c for c in codes if c == 1]
            self.bad = _SKIP_CAUSES[seen[0]] if seen else None
        if self.bad is None:
            if self.skips is not None:
                self.skips.stepped()
            return True
        for p in self.params:  # optimizer.zero_grad(set_to_none=True), for these parameters
            p.grad = None
        self.skipped["ratio" if self.bad == "ratio" else "nonfinite"] += 1
        reason = (
            f"an importance ratio beyond {self.max_ratio:g}"
            if self.bad == "ratio"
            else f"a non-finite {self.bad}"
        )
        warn(f"skipped a mini-batch with {reason}")
        if self.skips is not None:
            self.skips.skipped(reason)
        return False
