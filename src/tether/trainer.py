"""The RL loop: a thin orchestrator over the policy, the reward, the math and the run directory.

One step, for every estimator (`--advantage gae|grpo|rloo|reinforce++`): (1) rollout, G
completions per prompt -> (2) score -> (3) reference log-probs (and the exact KL for `full`) ->
(4) rewards, KL-shaped when the KL goes in the reward -> (5) advantages -> (6) epochs x
mini-batches of clipped updates, KL in the loss when it goes there -> (7) KL control -> (8) log
and checkpoint. The file reads top-down in that order after the state it keeps.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

from tether import distributed, ppo
from tether.config import TrainConfig, config_to_yaml
from tether.data import PromptRecord, load_prompts
from tether.errors import TetherError
from tether.guard import BEST, GUARD_JSON, Guard, GuardSettings
from tether.kl import KLController, make_kl_controller
from tether.models import load_model, resolve_device
from tether.policy import LoraSettings, Policy, PolicyOutput
from tether.rewards import RewardModel, checked_scores, load_reward
from tether.rollout import Experience, Rollout, SamplingParams, step_seed
from tether.rundir import (
    RunDir,
    atomic_dir,
    atomic_write_text,
    load_trainer_state,
    set_rng_state,
)
from tether.tracking import Tracker, check_tracker

Monitor = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> values


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
            policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        total_updates = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
        scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=total_updates
        )
        kl_ctl = make_kl_controller(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        return cls(
            policy,
            optimizer,
            scheduler,
            kl_ctl,
            RunningMoments(),
            SkipCounter(cfg.max_consecutive_skips),
        )

    def check_reward_scale(
        self, scores: torch.Tensor, seq_kl: torch.Tensor, kl_coef: float, cfg: TrainConfig
    ) -> None:
        """Warn once when the KL penalty in the reward dwarfs the spread of the scores the update
        sees: the advantages then mostly reward a short, reference-like completion, not a better
        one (a 0-0.05 toy reward at kl_coef 0.05 shrank completions and never rose)."""
        if self.scale_warned or cfg.kl_penalty != "reward" or kl_coef == 0 or len(scores) < 2:
            return
        penalty = kl_coef * seq_kl.abs().mean().item()
        spread = scores.std().item()
        # equal scores (std 0) carry no reward signal to drown: nothing to warn about
        if spread > 0 and penalty > REWARD_SCALE_WARNING * spread:
            self.scale_warned = True
            fix = (
                "lower --kl-coef or --lr (the scores are normalised already)"
                if cfg.score_norm
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


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    policy: Policy
    guard: dict[str, Any]  # guard.json: probes, best checkpoint, how the run ended


def warn(msg: str) -> None:
    """A warning that does not break the progress bar."""
    tqdm.write(f"warning: {msg}", file=sys.stderr)


def build_policy(cfg: TrainConfig, value_head: bool | None = None) -> Policy:
    """The configured policy; seeded, because LoRA's A matrices are drawn at build time. It has
    a value head when the estimator has a critic, unless `value_head` says otherwise."""
    if (
        cfg.adapter
        and not cfg.allow_bin_weights
        and (Path(cfg.adapter) / "adapter_model.bin").is_file()
        and not (Path(cfg.adapter) / "adapter_model.safetensors").is_file()
    ):
        raise TetherError(
            f"--adapter {cfg.adapter} holds only adapter_model.bin (a pickle); tether reads "
            "safetensors only by default: pass --allow-bin-weights to read it with "
            "torch.load(weights_only=True)"
        )
    # LoRA's A matrices are drawn here. `tether eval` has no --seed: the adapter it scores is
    # loaded over them (or disabled for the baseline)
    torch.manual_seed(getattr(cfg, "seed", 0))
    loaded = load_model(
        cfg.policy, dtype=cfg.dtype, device=resolve_device(cfg.device), **cfg.load_safety()
    )
    lora = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    policy = Policy(
        loaded,
        lora=lora,
        adapter=cfg.adapter,
        reference=cfg.reference,
        temperature=cfg.temperature,
        max_prompt_tokens=cfg.max_prompt_tokens,
        chat_template=cfg.chat_template,
        value_head=cfg.has_critic if value_head is None else value_head,
    )
    policy.distribute(distributed.engine())  # DDP / FSDP2 under a multi-process launch
    return policy


def sampling_params(cfg: TrainConfig) -> SamplingParams:
    return SamplingParams(
        cfg.max_new_tokens, cfg.min_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p
    )


def batch_indices(n_prompts: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Prompts for `step`: consecutive slices of one seeded permutation per pass over the data
    (derived from the step alone, so data order needs no state to resume)."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_prompts)
        perm = torch.randperm(
            n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch)
        )
        take = min(batch_size - len(out), n_prompts - offset)
        out.extend(perm[offset : offset + take].tolist())
    return out


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    reward: RewardModel | None = None,
    policy: Policy | None = None,
    records: list[PromptRecord] | None = None,
    monitors: dict[str, Monitor] | None = None,
    prepared: bool = False,
    judge: RewardModel | None = None,
    guard_reference: list[dict[str, Any]] | None = None,
) -> TrainResult:
    """Run PPO as configured, with the reward-hacking guard watching.

    Library callers may pass a built `reward`, `judge`, `policy` or training prompt `records`,
    and `monitors`: extra per-completion numbers (e.g. a gold judge's toxicity) logged as batch
    means each step. `prepared` says the caller already set up the run directory (detox does).
    `guard_reference`: the starting policy's probe rows from an earlier run with the same policy,
    probe prompts and seeds (the hacking demo's two arms share them).
    With guard probes on, training uses the prompt source's train split and the probes come from
    its held-out split.
    """
    check_tracker(cfg.report_to)
    distributed.check_supported()
    run = RunDir(distributed.run_root(cfg.out))
    config_yaml = config_to_yaml(cfg)
    probing = cfg.judge_every > 0
    split = "train" if probing else "all"
    records = records or load_prompts(cfg.prompts, split, cfg.heldout_fraction)
    records = _shard(records)
    probe_records = _probe_records(cfg) if probing else []
    reward = reward or load_reward(cfg.reward, cfg.device, **cfg.load_safety())
    if judge is None and cfg.judge:
        judge = load_reward(cfg.judge, cfg.device, **cfg.load_safety())
    if not prepared:
        run.check(config_yaml, cfg.resume, cfg.force)  # before the model loads: fail fast
    policy = policy or build_policy(cfg)
    policy.distribute(distributed.engine())  # (a policy from build_policy already is)
    if not prepared:  # ... and create the directory only once the model loaded
        run.prepare(config_yaml, cfg.resume, cfg.force)
    sampling = sampling_params(cfg)

    state = TrainState.create(policy, cfg)
    if distributed.world_size() > 1:  # processes share the leash and the score statistics
        state.kl_ctl = distributed.SyncedKLController(state.kl_ctl)
        state.score_moments = distributed.SyncedMoments(state.score_moments)
    start_step = _restore(run, policy, state) if cfg.resume else 0
    metrics = distributed.on_main(lambda: [r for r in run.read_metrics() if r["step"] < start_step])
    guard = Guard(
        GuardSettings(cfg.judge_every, cfg.kl_budget, cfg.on_hack, cfg.batch_size, cfg.seed + 4321),
        run,
        policy,
        reward,
        judge,
        probe_records,
        sampling,
        reference_rows=guard_reference,
    )
    guard.start(resumed_step=start_step - 1 if cfg.resume else None)
    tracker = Tracker(cfg.report_to, run.root, cfg, start_step)

    bar = tqdm(
        range(start_step, cfg.steps),
        desc="ppo",
        unit="step",
        disable=not cfg.progress or not distributed.is_main(),
        initial=start_step,
        total=cfg.steps,
        file=sys.stderr,
    )
    action, n_flags, step = None, 0, start_step - 1
    for step in bar:
        try:
            row = ppo_step(policy, reward, state, records, sampling, cfg, step, monitors)
        except TooManySkips as e:
            last = run.latest_checkpoint()
            raise TetherError(
                f"step {step}: {cfg.max_consecutive_skips} mini-batches in a row skipped (the "
                f"last for {e}); stopped. Last complete checkpoint: "
                f"{last or 'none (no checkpoint was written yet)'}; lower --lr or fix the input, "
                "then --resume"
            ) from None
        row = distributed.mean_over_processes(row)
        t_guard = time.perf_counter()
        # the same verdict on every process: the row is their mean, the probes rank 0's
        action = guard.after_step(step, row, last=step == cfg.steps - 1)
        row["guard_seconds"] = time.perf_counter() - t_guard  # this process's own
        for flag in row["guard"]["flags"]:
            warn(f"step {step}: guard flag {flag['flag']}: {flag['message']}")
        n_flags += len(row["guard"]["flags"])
        run.append_metrics(row)
        tracker.log(row)
        metrics.append(row)
        bar.set_postfix(
            reward=f"{row['reward_mean']:.3f}",
            kl=f"{row['kl_mean']:.3f}",
            **{k: f"{row[k]:.3f}" for k in monitors or {}},
            flags=n_flags,
        )
        if action:
            break
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            if _weights_finite(policy):
                # best/ travels with the checkpoint: a resumed run starts from the same best
                run.save_checkpoint(
                    step,
                    policy.save,
                    state.state_dict(),
                    config_yaml,
                    extra_dirs={BEST: run.root / BEST},
                )
            else:
                warn(f"step {step}: non-finite adapter weights; checkpoint not written")
    bar.close()
    tracker.close()
    run.save_final(policy.save, config_yaml)  # final/ is always the last step that ran
    ending: dict[str, Any] = {"last_step": step, "stopped_by_guard": action is not None}
    if action == "rollback":
        ending["rolled_back_to_step"] = guard.rollback()
        warn(
            f"guard: rolled back to {'the starting policy' if ending['rolled_back_to_step'] < 0 else 'best/ from step ' + str(ending['rolled_back_to_step'])}"
        )
    elif action == "stop":
        warn(f"guard: stopped after step {step} (--on-hack stop)")
    summary = {**guard.report(), **ending, "flags": n_flags}
    atomic_write_text(run.root / GUARD_JSON, json.dumps(summary, indent=2))
    return TrainResult(Path(cfg.out), metrics, policy, summary)


def _shard(records: list[PromptRecord]) -> list[PromptRecord]:
    """This process's share of the training prompts (all of them in a one-process run)."""
    n = distributed.world_size()
    if n == 1:
        return records
    if len(records) < n:
        raise TetherError(f"{len(records)} training prompts cannot be shared by {n} processes")
    return records[distributed.rank() :: n]


def _probe_records(cfg: TrainConfig) -> list[PromptRecord]:
    """The guard's probe set: the first prompts of the held-out split."""
    try:
        return load_prompts(cfg.prompts, "heldout", cfg.heldout_fraction)[: cfg.probe_prompts]
    except TetherError as e:
        if "holds no heldout prompts" not in str(e):
            raise
        raise TetherError(
            f"{e}: the guard probes held-out prompts every --judge-every {cfg.judge_every} steps; "
            "give more prompts, raise --heldout-fraction, or pass --judge-every 0"
        ) from None


def _weights_finite(policy: Policy) -> bool:
    """No NaN/inf in the adapter or value head (cheap: only the trainable parameters), on any
    process (each looks at its shards under FSDP2; all of them must agree to save)."""
    params = policy.trainable_parameters()
    return distributed.everywhere(
        all(bool(torch.isfinite(distributed.local(p)).all()) for p in params)
    )


def _restore(run: RunDir, policy: Policy, state: TrainState) -> int:
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


# ----------------------------------------------------------------------------------------------
# one step: 1-2 and 7-8 here, 3-5 and 6 below
# ----------------------------------------------------------------------------------------------


def ppo_step(
    policy: Policy,
    reward: RewardModel,
    state: TrainState,
    records: list[PromptRecord],
    sampling: SamplingParams,
    cfg: TrainConfig,
    step: int,
    monitors: dict[str, Monitor] | None = None,
) -> dict[str, Any]:
    """One step of the configured estimator; returns its metrics row."""
    t0 = time.perf_counter()
    torch.manual_seed(step_seed(cfg.seed, step))
    n_prompts = cfg.batch_size // cfg.group_size
    batch = [records[i] for i in batch_indices(len(records), n_prompts, cfg.seed, step)]
    # a group's G completions are consecutive rows: [p0] * G + [p1] * G + ...
    prompts = [r.prompt for r in batch for _ in range(cfg.group_size)]

    # 1. rollout
    rollout, rollout_out, n_truncated = policy.generate(prompts, sampling, cfg.rollout_dtype)
    release_freed_memory()
    if n_truncated:
        warn(
            f"step {step}: {n_truncated} prompt(s) longer than max_prompt_tokens {cfg.max_prompt_tokens} were cut from the left"
        )
    t_gen = time.perf_counter()
    # 2. score
    scores = checked_scores(reward, rollout.prompts, rollout.completions)
    t_score = time.perf_counter()
    # 3. reference log-probs (and the exact KL over the vocabulary for `full`)
    ref_logprobs, full_kl = reference_pass(policy, rollout, cfg)
    # ... and, for a rollout sampled in other numerics, the old policy's in training numerics
    rollout_out, is_weights, mismatch = rollout_correction(policy, rollout, rollout_out, cfg)
    release_freed_memory()
    t_fwd = time.perf_counter()
    # 4-5. rewards, advantages
    kl_coef = state.kl_ctl.value
    train_scores = train_scores_of(scores, rollout, state, cfg)
    exp = make_experience(
        rollout, rollout_out, ref_logprobs, train_scores, kl_coef, cfg, full_kl, is_weights
    )
    valid = rollout.valid_mask
    seq_kl = ppo.masked_sum(exp.kl, valid, dim=1)
    state.check_reward_scale(exp.scores, seq_kl, kl_coef, cfg)
    t_adv = time.perf_counter()
    # 6. update
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    stats = ppo_update(
        policy, state.optimizer, state.scheduler, exp, cfg, gen, state.skips, kl_coef
    )
    release_freed_memory()
    t_update = time.perf_counter()
    # 7. KL control, on the mean per-sequence KL of this batch
    state.kl_ctl.update(seq_kl.mean().item(), cfg.batch_size)

    # 8. metrics (on the raw scores, whatever the update saw)
    score_t = torch.tensor(scores)
    monitored = {
        name: float(sum(vals) / len(vals))
        for name, fn in (monitors or {}).items()
        if (vals := fn(rollout.prompts, rollout.completions))
    }
    critic, explained = {}, {}  # the critic's diagnostics, where there is one
    if cfg.has_critic:
        critic = {"value_loss": stats.get("value_loss", 0.0)}
        explained = {
            "explained_variance": ppo.explained_variance(exp.old_values, exp.returns, valid).item()
        }
    kl_in_loss = {"kl_loss": stats.get("kl_loss", 0.0)} if cfg.kl_penalty == "loss" else {}
    return {
        "step": step,
        "advantage": cfg.advantage,
        "reward_mean": score_t.mean().item(),
        "reward_std": score_t.std().item() if len(score_t) > 1 else 0.0,
        "kl_mean": seq_kl.mean().item(),
        "kl_coef": kl_coef,
        "policy_loss": stats["policy_loss"],
        **critic,
        **kl_in_loss,
        "clipfrac": stats["clipfrac"],
        **({"vf_clipfrac": stats.get("vf_clipfrac", 0.0)} if cfg.has_critic else {}),
        "approx_kl": stats["approx_kl"],
        "entropy": ppo.masked_mean(rollout_out.entropy, valid).item(),
        **explained,
        "non_score_reward_mean": ppo.masked_sum(-kl_coef * exp.kl, valid, dim=1).mean().item(),
        "response_len_mean": valid.sum(-1).float().mean().item(),
        "truncated_completions": int((~rollout.finished).sum()),
        "skipped_minibatches": stats["skipped_minibatches"],
        "skipped_nonfinite": stats["skipped_nonfinite"],
        "skipped_ratio": stats["skipped_ratio"],
        "ppo_epochs_run": stats["ppo_epochs_run"],
        "lr": state.scheduler.get_last_lr()[0],
        "truncated_prompts": n_truncated,
        **mismatch,
        "step_seconds": time.perf_counter() - t0,
        "gen_seconds": t_gen - t0,
        "score_seconds": t_score - t_gen,
        "forward_seconds": t_fwd - t_score,
        "advantages_seconds": t_adv - t_fwd,
        "update_seconds": t_update - t_adv,
        **monitored,
    }


def train_scores_of(
    scores: list[float], rollout: Rollout, state: TrainState, cfg: TrainConfig
) -> list[float]:
    """The scores the update sees: normalised by the running statistics with --score-norm,
    less --missing-eos-penalty for a completion cut at max_new_tokens."""
    out = state.score_moments.normalize(scores) if cfg.score_norm else list(scores)
    if cfg.missing_eos_penalty is not None:
        finished = rollout.finished.tolist()
        out = [
            s if done else s - cfg.missing_eos_penalty
            for s, done in zip(out, finished, strict=True)
        ]
    return out


# ----------------------------------------------------------------------------------------------
# experience: steps 3-5
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def full_kl_pass(
    policy: Policy, rollout: Rollout, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Policy.reference_logprobs`, and the exact per-token KL(rollout policy || reference) over
    the whole vocabulary (`--kl-estimator full`): each chunk is passed twice, adapter on and off,
    and only that chunk's (rows, t, v) logits of the two live at once."""
    shape = rollout.response_ids.shape
    ref_lp = torch.zeros(shape, device=rollout.response_ids.device)
    kl = torch.zeros(shape, device=rollout.response_ids.device)
    for idx in rollout.rows_by_length().split(cfg.forward_batch_size):
        chunk = rollout.select(idx)
        logits = policy(chunk, with_values=False, with_logits=True).logits
        with policy.reference():
            ref = policy(chunk, with_values=False, with_logits=True)
        t = ref.logprobs.shape[1]
        ref_lp[idx, :t] = ref.logprobs
        kl[idx, :t] = ppo.full_kl(logits, ref.logits, cfg.kl_chunk_size)
    return ref_lp, kl


def rollout_correction(
    policy: Policy, rollout: Rollout, rollout_out: PolicyOutput, cfg: TrainConfig
) -> tuple[PolicyOutput, torch.Tensor | None, dict[str, float]]:
    """For a rollout sampled with `--rollout-dtype` bfloat16/int8: the old policy's log-probs
    (and values) in training numerics, one pass without gradient, which the update's ratios
    and the KL then use; the truncated importance-sampling weights min(pi_train / pi_rollout,
    --tis-cap) on the policy loss (per completion for rloo); and the mismatch, logged every step.
    A float32 rollout is training's own: returned as it is, no weights, nothing logged."""
    if cfg.rollout_dtype == "float32":
        return rollout_out, None, {}
    valid = rollout.valid_mask
    train = policy.score(rollout, cfg.has_critic, batch_size=cfg.forward_batch_size)
    weights = ppo.truncated_is_weights(
        train.logprobs,
        rollout_out.logprobs,
        valid,
        cfg.tis_cap,
        per_sequence=cfg.loss_aggregation is None,
    )
    mismatch = ppo.rollout_mismatch(train.logprobs, rollout_out.logprobs, valid, cfg.tis_cap)
    mismatch = {k: v.item() for k, v in mismatch.items()}
    # the largest over every process (the row's other figures are averaged over them later)
    mismatch["rollout_max_ratio"] = max(distributed.gather_floats([mismatch["rollout_max_ratio"]]))
    corrected = PolicyOutput(train.logprobs, train.values, rollout_out.entropy).masked(valid)
    return corrected, weights, mismatch


def reference_pass(
    policy: Policy, rollout: Rollout, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's log-probs, and the exact KL where `--kl-estimator full` asks for it."""
    if cfg.kl_estimator == "full":
        return full_kl_pass(policy, rollout, cfg)
    return policy.reference_logprobs(rollout, batch_size=cfg.forward_batch_size), None


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    rollout_out: PolicyOutput,
    ref_logprobs: torch.Tensor,
    scores: list[float],
    kl_coef: float,
    cfg: TrainConfig,
    kl: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> Experience:
    """Rewards and advantages of the configured estimator.

    `rollout_out` holds the rollout policy's log-probs (and values, with a critic), taken from
    the sampling pass; `ref_logprobs` come from `Policy.reference_logprobs`; `kl` is the exact KL
    of `full_kl_pass`, else the configured estimator is applied to the two log-probs;
    `is_weights` are `rollout_correction`'s, carried to the update as they are.
    """
    valid = rollout.valid_mask
    old_logprobs, old_values = rollout_out.logprobs, rollout_out.values
    score_t = torch.tensor(scores, dtype=torch.float32, device=old_logprobs.device)
    if kl is None:
        if cfg.kl_estimator == "full":
            raise ValueError("kl_estimator full: pass the exact KL that reference_pass returns")
        kl = ppo.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator)
    kl = torch.where(valid.bool(), kl, torch.zeros_like(kl))
    # 4. rewards: the score on the last token, - beta * KL_t on every token when it goes there
    penalty_coef = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards = ppo.shaped_rewards(score_t, kl, penalty_coef, valid)
    # 5. advantages
    advantages, returns = estimate_advantages(rewards, old_values, valid, cfg)
    loss_mask = valid
    if cfg.mask_truncated_completions:
        loss_mask = valid * rollout.finished.unsqueeze(1).to(valid.dtype)
    return Experience(
        rollout,
        old_logprobs,
        ref_logprobs,
        old_values,
        score_t,
        kl,
        rewards,
        advantages,
        returns,
        loss_mask,
        is_weights,
    )


def estimate_advantages(
    rewards: torch.Tensor, values: torch.Tensor | None, valid: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, t) advantages of `cfg.advantage`, and the critic's targets (None without a critic)."""
    # per-batch normalisations see the global batch (every process's rows) under a multi-process
    # launch, as one process training on all of them would
    if cfg.advantage == "gae":
        advantages, returns = ppo.gae_advantages(rewards, values, valid, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = distributed.on_global_batch(ppo.masked_whiten, advantages, valid)
        return advantages, returns
    if cfg.advantage == "reinforce++":
        reinforce_pp = functools.partial(ppo.reinforce_pp_advantages, gamma=cfg.gamma)
        return distributed.on_global_batch(reinforce_pp, rewards, valid), None
    # grpo / rloo: one reward per completion, score - beta * sum_t KL_t with the KL in the reward
    seq_rewards = ppo.masked_sum(rewards, valid, dim=1)
    if cfg.advantage == "grpo":
        seq_adv = ppo.group_advantages(seq_rewards, cfg.group_size, scale=cfg.grpo_std)
    else:
        seq_adv = ppo.rloo_advantages(seq_rewards, cfg.group_size)
    advantages = seq_adv.unsqueeze(1).expand_as(rewards)  # every token carries its completion's
    return torch.where(valid.bool(), advantages, torch.zeros_like(advantages)), None


# ----------------------------------------------------------------------------------------------
# update: step 6
# ----------------------------------------------------------------------------------------------


def micro_batch_size(cfg: TrainConfig, device: torch.device) -> int:
    """Completions per forward/backward in the update.

    With --gradient-accumulation-steps unset: 2 on CPU, where a mini-batch of 4 trains as fast in
    micro-batches of 2 and autograd keeps half the activations (`benchmarks/ppo_step.py --memory`
    measures both), and the whole mini-batch on an accelerator, where bigger matmuls are faster
    and memory is budgeted by the batch sizes.
    """
    if cfg.gradient_accumulation_steps is None:
        return min(2, cfg.mini_batch_size) if device.type == "cpu" else cfg.mini_batch_size
    return cfg.mini_batch_size // cfg.gradient_accumulation_steps


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
    for _epoch in range(cfg.ppo_epochs):
        stats.epochs_run += 1
        for mb_idx in torch.randperm(len(exp), generator=generator).split(cfg.mini_batch_size):
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
                    loss, terms = ppo.rl_loss(
                        out.logprobs,
                        mu.old_logprobs,
                        mu.advantages,
                        mu.loss_mask,
                        cfg.cliprange,
                        cfg.loss_aggregation,
                        kl=kl,
                        kl_coef=cfg.kl_coef if kl_coef is None else kl_coef,
                        values=out.values,
                        old_values=mu.old_values,
                        returns=mu.returns,
                        cliprange_value=cfg.cliprange_value,
                        vf_coef=cfg.vf_coef,
                        is_weights=mu.is_weights,
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
            if cfg.early_stop_kl is not None and mb_stats["approx_kl"] > cfg.early_stop_kl:
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
        "max_len": cfg.max_new_tokens,
    }


def _policy_pass(
    policy: Policy, mu: Experience, cfg: TrainConfig
) -> tuple[PolicyOutput, torch.Tensor | None]:
    """The policy's forward for the loss, and the KL to the reference when it goes in the loss
    (the full KL runs the reference on the same micro-batch, adapter off, without grad)."""
    full = cfg.kl_penalty == "loss" and cfg.kl_estimator == "full"
    out = policy(mu.rollout, with_values=cfg.has_critic, with_logits=full)
    if cfg.kl_penalty != "loss":
        return out, None
    if not full:
        return out, ppo.kl_estimate(out.logprobs, mu.ref_logprobs, cfg.kl_estimator)
    with torch.no_grad(), policy.reference():
        ref_logits = policy(mu.rollout, with_values=False, with_logits=True).logits
    return out, ppo.full_kl(out.logits, ref_logits, cfg.kl_chunk_size)


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
    mean per-token ratio new/old is beyond `cfg.max_importance_ratio` either way (above it or
    below its inverse), is skipped (no optimiser step) and counted; `skips` counts them in a row
    across calls and raises TooManySkips at its limit. With several processes every one goes
    through the same backward passes and they skip or step together (see `check`,
    `allows_step`).
    """

    def __init__(
        self, cfg: TrainConfig, params: list[torch.nn.Parameter], skips: SkipCounter | None
    ) -> None:
        self.params = params
        self.max_grad_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        self.max_ratio = cfg.max_importance_ratio
        ratio = cfg.max_importance_ratio
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
