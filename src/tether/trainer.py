"""The RL loop: one step, for every estimator (`--advantage gae|grpo|rloo|reinforce++`), and the
run around it.

(1) rollout, G completions per prompt -> (2) score (1-2 in rounds with --dynamic-sampling, until
the groups differ) -> (3) reference log-probs (and the exact KL for `full`) -> (4) rewards,
KL-shaped when the KL goes in the reward -> (5) advantages ->
(6) epochs x mini-batches of clipped updates, KL in the loss when it goes there -> (7) KL
control -> (8) log and checkpoint. Steps 3-5 live in tether.experience, 6 in tether.update, the
state a resumed run needs in tether.state.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tether import distributed, losses, ppo
from tether.config import TrainConfig
from tether.data import PromptRecord, load_prompts
from tether.errors import TetherError, warn
from tether.experience import length_shaping, make_experience, reference_pass, train_scores_of
from tether.guard import BEST, GUARD_JSON, Guard, GuardSettings
from tether.models import load_model, resolve_device
from tether.option_groups import ModelOptions, SamplingOptions
from tether.options import config_to_yaml
from tether.policy import LoraSettings, Policy, PolicyOutput
from tether.rewards import RewardModel, checked_scores, load_reward
from tether.rollout import Experience, Rollout, SamplingParams, cat_rollouts, step_seed
from tether.rundir import RunDir, atomic_write_text
from tether.state import TooManySkips, TrainState, release_freed_memory, restore, weights_finite
from tether.tracking import Tracker, check_tracker
from tether.update import ppo_update

Monitor = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> values


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    policy: Policy
    guard: dict[str, Any]  # guard.json: probes, best checkpoint, how the run ended


def build_policy(cfg: TrainConfig, value_head: bool | None = None) -> Policy:
    """The policy of a training run: with a value head when the estimator has a critic, unless
    `value_head` says otherwise."""
    critic = cfg.rl.has_critic if value_head is None else value_head
    return load_policy(cfg.model, cfg.sampling, cfg.training.seed, critic)


def load_policy(
    model: ModelOptions, sampling: SamplingOptions, seed: int, value_head: bool
) -> Policy:
    """The configured policy; seeded, because LoRA's A matrices are drawn at build time."""
    if (
        model.adapter
        and not model.allow_bin_weights
        and (Path(model.adapter) / "adapter_model.bin").is_file()
        and not (Path(model.adapter) / "adapter_model.safetensors").is_file()
    ):
        raise TetherError(
            f"--adapter {model.adapter} holds only adapter_model.bin (a pickle); tether reads "
            "safetensors only by default: pass --allow-bin-weights to read it with "
            "torch.load(weights_only=True)"
        )
    torch.manual_seed(seed)  # LoRA's A matrices are drawn here
    loaded = load_model(
        model.policy,
        dtype=model.dtype,
        device=resolve_device(model.device),
        **model.load_safety(),
    )
    lora = LoraSettings(
        model.lora_r, model.lora_alpha, model.lora_dropout, model.lora_target_modules
    )
    policy = Policy(
        loaded,
        lora=lora,
        adapter=model.adapter,
        reference=model.reference,
        temperature=sampling.temperature,
        max_prompt_tokens=sampling.max_prompt_tokens,
        chat_template=sampling.chat_template,
        value_head=value_head,
    )
    policy.distribute(distributed.engine())  # DDP / FSDP2 under a multi-process launch
    return policy


def sampling_params(sampling: SamplingOptions) -> SamplingParams:
    return SamplingParams(
        sampling.max_new_tokens,
        sampling.min_new_tokens,
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
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
    check_tracker(cfg.training.report_to)
    distributed.check_supported()
    run = RunDir(distributed.run_root(cfg.run.out))
    config_yaml = config_to_yaml(cfg)
    probing = cfg.guard.judge_every > 0
    split = "train" if probing else "all"
    records = records or load_prompts(cfg.task.prompts, split, cfg.task.heldout_fraction)
    records = _shard(records)
    probe_records = _probe_records(cfg) if probing else []
    reward = reward or load_reward(cfg.task.reward, cfg.model.device, **cfg.model.load_safety())
    if judge is None and cfg.task.judge:
        judge = load_reward(cfg.task.judge, cfg.model.device, **cfg.model.load_safety())
    if not prepared:
        run.check(
            config_yaml, cfg.training.resume, cfg.training.force
        )  # before the model loads: fail fast
    policy = policy or build_policy(cfg)
    policy.distribute(distributed.engine())  # (a policy from build_policy already is)
    if not prepared:  # ... and create the directory only once the model loaded
        run.prepare(config_yaml, cfg.training.resume, cfg.training.force)
    sampling = sampling_params(cfg.sampling)

    state = TrainState.create(policy, cfg)
    if distributed.world_size() > 1:  # processes share the leash and the score statistics
        state.kl_ctl = distributed.SyncedKLController(state.kl_ctl)
        state.score_moments = distributed.SyncedMoments(state.score_moments)
    start_step = restore(run, policy, state) if cfg.training.resume else 0
    metrics = distributed.on_main(lambda: [r for r in run.read_metrics() if r["step"] < start_step])
    guard = Guard(
        GuardSettings(
            cfg.guard.judge_every,
            cfg.guard.kl_budget,
            cfg.guard.on_hack,
            cfg.rl.batch_size,
            cfg.training.seed + 4321,
        ),
        run,
        policy,
        reward,
        judge,
        probe_records,
        sampling,
        reference_rows=guard_reference,
    )
    guard.start(resumed_step=start_step - 1 if cfg.training.resume else None)
    tracker = Tracker(cfg.training.report_to, run.root, cfg, start_step)

    bar = tqdm(
        range(start_step, cfg.rl.steps),
        desc="ppo",
        unit="step",
        disable=not cfg.run.progress or not distributed.is_main(),
        initial=start_step,
        total=cfg.rl.steps,
        file=sys.stderr,
    )
    action, n_flags, step = None, 0, start_step - 1
    for step in bar:
        try:
            row = ppo_step(policy, reward, state, records, sampling, cfg, step, monitors)
        except TooManySkips as e:
            last = run.latest_checkpoint()
            raise TetherError(
                f"step {step}: {cfg.rl.max_consecutive_skips} mini-batches in a row skipped (the "
                f"last for {e}); stopped. Last complete checkpoint: "
                f"{last or 'none (no checkpoint was written yet)'}; lower --lr or fix the input, "
                "then --resume"
            ) from None
        row = distributed.mean_over_processes(row)
        t_guard = time.perf_counter()
        # the same verdict on every process: the row is their mean, the probes rank 0's
        action = guard.after_step(step, row, last=step == cfg.rl.steps - 1)
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
        if (
            cfg.training.save_every
            and (step + 1) % cfg.training.save_every == 0
            and step + 1 < cfg.rl.steps
        ):
            if weights_finite(policy):
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
    return TrainResult(Path(cfg.run.out), metrics, policy, summary)


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
        return load_prompts(cfg.task.prompts, "heldout", cfg.task.heldout_fraction)[
            : cfg.guard.probe_prompts
        ]
    except TetherError as e:
        if "holds no heldout prompts" not in str(e):
            raise
        raise TetherError(
            f"{e}: the guard probes held-out prompts every --judge-every {cfg.guard.judge_every} steps; "
            "give more prompts, raise --heldout-fraction, or pass --judge-every 0"
        ) from None


# ----------------------------------------------------------------------------------------------
# one step: 1-2 and 7-8 here, 3-5 in tether.experience, 6 in tether.update
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
    torch.manual_seed(step_seed(cfg.training.seed, step))
    # 1-2. rollout and score (with --dynamic-sampling, in rounds until the groups differ)
    sampled = rollout_and_score(policy, reward, records, sampling, cfg, step)
    rollout, rollout_out, scores = sampled.rollout, sampled.rollout_out, sampled.scores
    n_truncated = sampled.truncated_prompts
    if n_truncated:
        warn(
            f"step {step}: {n_truncated} prompt(s) longer than max_prompt_tokens {cfg.sampling.max_prompt_tokens} were cut from the left"
        )
    t_gen = t0 + sampled.gen_seconds
    t_score = time.perf_counter()
    # 3. reference log-probs (and the exact KL over the vocabulary for `full`)
    ref_logprobs, full_kl = reference_pass(policy, rollout, cfg)
    release_freed_memory()
    t_fwd = time.perf_counter()
    # 4-5. rewards, advantages
    kl_coef = state.kl_ctl.value
    train_scores = train_scores_of(scores, rollout, state, cfg)
    exp = make_experience(rollout, rollout_out, ref_logprobs, train_scores, kl_coef, cfg, full_kl)
    valid = rollout.valid_mask
    seq_kl = ppo.masked_sum(exp.kl, valid, dim=1)
    state.check_reward_scale(exp.scores, seq_kl, kl_coef, cfg)
    t_adv = time.perf_counter()
    # 6. update
    gen = torch.Generator().manual_seed(step_seed(cfg.training.seed, step))
    stats = ppo_update(
        policy, state.optimizer, state.scheduler, exp, cfg, gen, state.skips, kl_coef
    )
    release_freed_memory()
    t_update = time.perf_counter()
    # 7. KL control, on the mean per-sequence KL of this batch
    state.kl_ctl.update(seq_kl.mean().item(), cfg.rl.batch_size)

    # 8. metrics (on the raw scores, whatever the update saw)
    monitored = {
        name: float(sum(vals) / len(vals))
        for name, fn in (monitors or {}).items()
        if (vals := fn(rollout.prompts, rollout.completions))
    }
    seconds = {
        "step_seconds": time.perf_counter() - t0,  # the monitors included
        "gen_seconds": t_gen - t0,
        "score_seconds": t_score - t_gen,
        "forward_seconds": t_fwd - t_score,
        "advantages_seconds": t_adv - t_fwd,
        "update_seconds": t_update - t_adv,
    }
    row = metrics_row(step, cfg, scores, exp, rollout_out.entropy, seq_kl, kl_coef, stats)
    if cfg.rl.dynamic_sampling:
        # the policy's reward is that of every completion it sampled, not of the kept groups
        row["reward_mean"] = statistics.fmean(sampled.all_scores)
        row["reward_std"] = statistics.stdev(sampled.all_scores)
        row["dropped_groups"] = sampled.dropped_groups
        row["sampling_rounds"] = sampled.rounds
    lr = state.scheduler.get_last_lr()[0]
    return {**row, "lr": lr, "truncated_prompts": n_truncated, **seconds, **monitored}


@dataclass
class Sampled:
    """Steps 1-2 of a step: the batch that trains, its raw scores, and what it took."""

    rollout: Rollout
    rollout_out: PolicyOutput
    scores: list[float]  # raw scores of the batch's completions
    all_scores: list[float]  # raw scores of every completion sampled, dropped groups included
    truncated_prompts: int
    dropped_groups: int  # groups sampled with one score throughout, left out of the batch
    rounds: int  # rounds of sampling (1 without --dynamic-sampling)
    gen_seconds: float  # generation only, every round's


def rollout_and_score(
    policy: Policy,
    reward: RewardModel,
    records: list[PromptRecord],
    sampling: SamplingParams,
    cfg: TrainConfig,
    step: int,
) -> Sampled:
    """Sample G completions of each of the step's prompts and score them.

    With --dynamic-sampling (DAPO, Yu et al. 2025, sec. 3.2), a group whose completions all got
    the same score and the same length shaping has no group-relative advantage: it is dropped,
    and further rounds sample other prompts (another permutation of the data per round) until
    the batch holds batch_size / G groups that differ, or --max-extra-sampling-rounds ran out;
    a batch still short is then filled with dropped groups (advantage 0: no policy gradient),
    so every step trains on batch_size completions. Under several processes, all of them run
    the same number of rounds (the generation is collective under FSDP2).
    """
    group = cfg.rl.group_size
    n_prompts = cfg.rl.batch_size // group
    rounds = 1 + (cfg.rl.max_extra_sampling_rounds if cfg.rl.dynamic_sampling else 0)
    kept: list[tuple[Rollout, PolicyOutput, list[float]]] = []
    spare: list[tuple[Rollout, PolicyOutput, list[float]]] = []
    all_scores: list[float] = []
    n_kept = n_truncated = 0
    gen_seconds = 0.0
    for round_ in range(rounds):
        # round 0 is the step's batch as without dynamic sampling; later rounds other prompts
        seed = cfg.training.seed + round_ * 104_729
        batch = [records[i] for i in batch_indices(len(records), n_prompts, seed, step)]
        # a group's G completions are consecutive rows: [p0] * G + [p1] * G + ...
        prompts = [r.prompt for r in batch for _ in range(group)]
        t0 = time.perf_counter()
        rollout, rollout_out, truncated = policy.generate(prompts, sampling)
        release_freed_memory()
        gen_seconds += time.perf_counter() - t0
        n_truncated += truncated
        scores = checked_scores(reward, rollout.prompts, rollout.completions)
        if not cfg.rl.dynamic_sampling:
            return Sampled(rollout, rollout_out, scores, scores, n_truncated, 0, 1, gen_seconds)
        all_scores += scores
        # one score and one length shaping throughout: every advantage of the group is 0
        flat = ppo.constant_groups(torch.tensor(scores, dtype=torch.float64), group) & (
            ppo.constant_groups(
                torch.tensor(length_shaping(rollout, cfg), dtype=torch.float64), group
            )
        )
        for rows, out in ((~flat, kept), (flat, spare)):
            idx = rows.repeat_interleave(group).nonzero().squeeze(1)
            if len(idx):
                part = rollout.select(idx)
                t = part.response_ids.shape[1]
                out.append((part, rollout_out.select(idx, t), [scores[i] for i in idx.tolist()]))
        n_kept += int((~flat).sum())
        if distributed.everywhere(n_kept >= n_prompts):
            break
    # the first n_prompts groups that differ, then dropped ones while the batch is short
    parts, rows_left = [], cfg.rl.batch_size
    for part_rollout, part_out, part_scores in kept + spare:
        if rows_left == 0:
            break
        if rows_left < len(part_rollout):  # whole groups: rows_left is a multiple of G
            idx = torch.arange(rows_left)
            part_rollout = part_rollout.select(idx)
            part_out = part_out.select(idx, part_rollout.response_ids.shape[1])
            part_scores = part_scores[:rows_left]
        parts.append((part_rollout, part_out, part_scores))
        rows_left -= len(part_rollout)
    n_spare = sum(len(r) for r, _, _ in spare) // group
    filler = max(n_prompts - n_kept, 0)
    return Sampled(
        cat_rollouts(
            [r for r, _, _ in parts],
            policy.tokenizer.pad_token_id,
            left_pad_prompts=policy.tokenizer.padding_side == "left",
        ),
        PolicyOutput.cat([o for _, o, _ in parts]),
        [s for _, _, part_scores in parts for s in part_scores],
        all_scores,
        n_truncated,
        n_spare - filler,
        round_ + 1,
        gen_seconds,
    )


def metrics_row(
    step: int,
    cfg: TrainConfig,
    scores: list[float],
    exp: Experience,
    entropy: torch.Tensor,
    seq_kl: torch.Tensor,
    kl_coef: float,
    stats: dict[str, float],
) -> dict[str, Any]:
    """A step's metrics.jsonl row: the raw scores, the KL, the update's diagnostics (the critic's
    only with a critic, the KL loss only when the KL goes in the loss) and the completions'
    shape."""
    valid = exp.rollout.valid_mask
    score_t = torch.tensor(scores)
    critic = cfg.rl.has_critic
    explained = losses.explained_variance(exp.old_values, exp.returns, valid) if critic else None
    # the keys in the order metrics.jsonl has always had them
    return {
        "step": step,
        "advantage": cfg.rl.advantage,
        "reward_mean": score_t.mean().item(),
        "reward_std": score_t.std().item() if len(score_t) > 1 else 0.0,
        "kl_mean": seq_kl.mean().item(),
        "kl_coef": kl_coef,
        "policy_loss": stats["policy_loss"],
        **({"value_loss": stats.get("value_loss", 0.0)} if critic else {}),
        **({"kl_loss": stats.get("kl_loss", 0.0)} if cfg.kl.kl_penalty == "loss" else {}),
        "clipfrac": stats["clipfrac"],
        **({"vf_clipfrac": stats.get("vf_clipfrac", 0.0)} if critic else {}),
        "approx_kl": stats["approx_kl"],
        "entropy": ppo.masked_mean(entropy, valid).item(),
        **({"explained_variance": explained.item()} if critic else {}),
        "non_score_reward_mean": ppo.masked_sum(-kl_coef * exp.kl, valid, dim=1).mean().item(),
        "response_len_mean": valid.sum(-1).float().mean().item(),
        "truncated_completions": int((~exp.rollout.finished).sum()),
        "skipped_minibatches": stats["skipped_minibatches"],
        "skipped_nonfinite": stats["skipped_nonfinite"],
        "skipped_ratio": stats["skipped_ratio"],
        "ppo_epochs_run": stats["ppo_epochs_run"],
    }


# What every key of a metrics.jsonl row means: the docs' reference page is generated from this,
# and the tests check that every key a run writes is here. `guard.*` keys nest under "guard".
METRICS_FIELDS: dict[str, str] = {
    "step": "the step, counted from 0",
    "advantage": "the estimator, `--advantage`",
    "reward_mean": "mean raw score of the step's completions (before `--score-norm` and "
    "`--missing-eos-penalty`; with `--dynamic-sampling`, of every completion sampled, dropped "
    "groups included)",
    "reward_std": "standard deviation of those scores",
    "kl_mean": "mean per-completion KL to the reference (nats, summed over tokens, "
    "`--kl-estimator`)",
    "kl_coef": "the KL coefficient beta this step used (moves with `--target-kl`)",
    "policy_loss": "the policy loss, mean over the update's mini-batches",
    "value_loss": "the clipped value loss (`gae` only)",
    "kl_loss": "the KL term of the loss, before beta (`--kl-penalty loss` only)",
    "clipfrac": "share of tokens whose importance ratio was clipped (gspo: whose completion's "
    "was; cispo: whose weight was capped; sapo: 0)",
    "vf_clipfrac": "share of values whose update was clipped (`gae` only)",
    "approx_kl": "k2 estimate of the KL between the rollout policy and the updated one: how "
    "far the update moved",
    "entropy": "mean per-token entropy of the rollout policy",
    "explained_variance": "how much of the returns' variance the critic explains (`gae` only)",
    "non_score_reward_mean": "mean per-completion KL penalty, -beta x KL (in the reward only "
    "with `--kl-penalty reward`)",
    "response_len_mean": "mean completion length in tokens",
    "truncated_completions": "completions cut at `--max-new-tokens` without EOS",
    "skipped_minibatches": "mini-batches skipped by the numeric guards this step",
    "skipped_nonfinite": "of those, skipped for a NaN/inf loss or gradient",
    "skipped_ratio": "of those, skipped for a mean importance ratio beyond "
    "`--max-importance-ratio`",
    "dropped_groups": "groups whose completions all got the same score, left out of the batch "
    "(`--dynamic-sampling` only)",
    "sampling_rounds": "rounds of rollout and scoring the step took (`--dynamic-sampling` only)",
    "ppo_epochs_run": "epochs the update ran (fewer than `--ppo-epochs` after `--early-stop-kl`)",
    "lr": "the learning rate after this step's scheduler step",
    "truncated_prompts": "prompts cut from the left to `--max-prompt-tokens`",
    "step_seconds": "wall time of the whole step",
    "gen_seconds": "of which sampling the completions",
    "score_seconds": "scoring them with the reward",
    "forward_seconds": "the reference pass (and the exact KL's policy pass)",
    "advantages_seconds": "rewards and advantages",
    "update_seconds": "the update's epochs and mini-batches",
    "guard_seconds": "the guard's checks and probes",
    "proxy_toxicity": "`detox`, `hacking-demo`: mean toxicity of the batch under the proxy "
    "reward (`proxy_score` when higher is better)",
    "proxy_score": "as `proxy_toxicity`, for a reward where higher is better",
    "judge_toxicity": "`detox`, `hacking-demo`: mean toxicity of the batch under the gold judge "
    "(`judge_score` when higher is better)",
    "judge_score": "as `judge_toxicity`, for a judge where higher is better",
    "guard": "the guard's object for this step",
    "guard.flags": "the flags raised this step: `name`, `message` and the evidence",
    "guard.probe": "on probe steps (`--judge-every`): the probe set's means",
    "guard.probe.proxy_mean": "mean proxy reward of the probe completions",
    "guard.probe.gold_mean": "mean gold-judge score (null without `--judge`)",
    "guard.probe.kl_mean": "mean per-completion KL to the reference (nats)",
    "guard.probe.sqrt_kl": "its square root, the x-axis of Gao et al. (2022)",
    "guard.probe.perplexity": "the reference model's perplexity of the completions",
    "guard.probe.distinct_1": "distinct unigrams over all probe completions",
    "guard.probe.distinct_2": "distinct bigrams over all probe completions",
    "guard.probe.repetition": "mean share of 3-grams repeated within a completion",
    "guard.probe.response_tokens": "mean completion length in tokens",
    "guard.probe.eos_rate": "share of completions that end with EOS",
    "guard.rising_ngrams": "on probe steps: the 1-3-grams whose counts rose most against the "
    "starting policy (stop words skipped)",
}
