"""Steps 3-5 of a step: the reference's log-probs (and the exact KL for `full`), the rewards
with the KL where it goes, and every estimator's advantages, into one `Experience`."""

from __future__ import annotations

import functools

import torch

from tether import distributed, ppo
from tether.config import TrainConfig
from tether.policy import Policy, PolicyOutput
from tether.rollout import Experience, Rollout
from tether.state import TrainState


def train_scores_of(
    scores: list[float], rollout: Rollout, state: TrainState, cfg: TrainConfig
) -> list[float]:
    """The scores the update sees: normalised by the running statistics with --score-norm,
    then shaped by the completions' length (`length_shaping`)."""
    out = state.score_moments.normalize(scores) if cfg.rl.score_norm else list(scores)
    return [s + shaping for s, shaping in zip(out, length_shaping(rollout, cfg), strict=True)]


def length_shaping(rollout: Rollout, cfg: TrainConfig) -> list[float]:
    """What each completion's length adds to its score: -(--missing-eos-penalty) for one cut at
    max_new_tokens, and DAPO's soft overlong punishment, --overlong-penalty x R_length
    (`ppo.overlong_penalty`), over the last --overlong-buffer tokens."""
    # float64: the scores are Python floats, and s + (-p) is then exactly s - p
    shaping = torch.zeros(len(rollout), dtype=torch.float64)
    if cfg.rl.missing_eos_penalty is not None:
        shaping -= cfg.rl.missing_eos_penalty * (~rollout.finished).double().cpu()
    if cfg.rl.overlong_buffer is not None:
        lengths = rollout.valid_mask.sum(1).cpu().double()
        r_length = ppo.overlong_penalty(
            lengths, cfg.sampling.max_new_tokens, cfg.rl.overlong_buffer
        )
        shaping += cfg.rl.overlong_penalty * r_length
    return shaping.tolist()


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
    for idx in rollout.rows_by_length().split(cfg.rl.forward_batch_size):
        chunk = rollout.select(idx)
        logits = policy(chunk, with_values=False, with_logits=True).logits
        with policy.reference():
            ref = policy(chunk, with_values=False, with_logits=True)
        t = ref.logprobs.shape[1]
        ref_lp[idx, :t] = ref.logprobs
        kl[idx, :t] = ppo.full_kl(logits, ref.logits, cfg.kl.kl_chunk_size)
    return ref_lp, kl


def reference_pass(
    policy: Policy, rollout: Rollout, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's log-probs, and the exact KL where `--kl-estimator full` asks for it."""
    if cfg.kl.kl_estimator == "full":
        return full_kl_pass(policy, rollout, cfg)
    return policy.reference_logprobs(rollout, batch_size=cfg.rl.forward_batch_size), None


@torch.no_grad()
def make_experience(
    rollout: Rollout,
    rollout_out: PolicyOutput,
    ref_logprobs: torch.Tensor,
    scores: list[float],
    kl_coef: float,
    cfg: TrainConfig,
    kl: torch.Tensor | None = None,
) -> Experience:
    """Rewards and advantages of the configured estimator.

    `rollout_out` holds the rollout policy's log-probs (and values, with a critic), taken from
    the sampling pass; `ref_logprobs` come from `Policy.reference_logprobs`; `kl` is the exact KL
    of `full_kl_pass`, else the configured estimator is applied to the two log-probs.
    """
    valid = rollout.valid_mask
    old_logprobs, old_values = rollout_out.logprobs, rollout_out.values
    score_t = torch.tensor(scores, dtype=torch.float32, device=old_logprobs.device)
    if kl is None:
        if cfg.kl.kl_estimator == "full":
            raise ValueError("kl_estimator full: pass the exact KL that reference_pass returns")
        kl = ppo.kl_estimate(old_logprobs, ref_logprobs, cfg.kl.kl_estimator)
    kl = torch.where(valid.bool(), kl, torch.zeros_like(kl))
    # 4. rewards: the score on the last token, - beta * KL_t on every token when it goes there
    penalty_coef = kl_coef if cfg.kl.kl_penalty == "reward" else 0.0
    rewards = ppo.shaped_rewards(score_t, kl, penalty_coef, valid)
    # 5. advantages
    advantages, returns = estimate_advantages(rewards, old_values, valid, cfg)
    loss_mask = valid
    if cfg.rl.mask_truncated_completions:
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
    )


def estimate_advantages(
    rewards: torch.Tensor, values: torch.Tensor | None, valid: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, t) advantages of `cfg.rl.advantage`, and the critic's targets (None without a critic)."""
    # per-batch normalisations see the global batch (every process's rows) under a multi-process
    # launch, as one process training on all of them would
    if cfg.rl.advantage == "gae":
        advantages, returns = ppo.gae_advantages(rewards, values, valid, cfg.rl.gamma, cfg.rl.lam)
        if cfg.rl.whiten_advantages:
            advantages = distributed.on_global_batch(ppo.masked_whiten, advantages, valid)
        return advantages, returns
    if cfg.rl.advantage == "reinforce++":
        reinforce_pp = functools.partial(ppo.reinforce_pp_advantages, gamma=cfg.rl.gamma)
        return distributed.on_global_batch(reinforce_pp, rewards, valid), None
    # grpo / rloo: one reward per completion, score - beta * sum_t KL_t with the KL in the reward
    seq_rewards = ppo.masked_sum(rewards, valid, dim=1)
    if cfg.rl.advantage == "grpo":
        seq_adv = ppo.group_advantages(seq_rewards, cfg.rl.group_size, scale=cfg.rl.grpo_std)
    else:
        seq_adv = ppo.rloo_advantages(seq_rewards, cfg.rl.group_size)
    advantages = seq_adv.unsqueeze(1).expand_as(rewards)  # every token carries its completion's
    return torch.where(valid.bool(), advantages, torch.zeros_like(advantages)), None
