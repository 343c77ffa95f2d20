"""PPO math for language models: pure tensor functions, no I/O, no config, no `.item()`.

Notation: `b` = batch (sequences), `t` = response tokens, `v` = vocabulary. Every per-token tensor
is aligned with the response: position `t` is the `t`-th generated token, and `valid_mask` (b, t)
is 1 for tokens the policy actually emitted (up to and including its EOS) and 0 for padding.

Sources:
- PPO clipped objective: Schulman et al. 2017, arXiv 1707.06347, eq. 7.
- GAE: Schulman et al. 2015, arXiv 1506.02438, eq. 16.
- KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence" (2020), joschu.net/blog/kl-approx.html.
- Per-token KL-shaped reward: Ziegler et al. 2019, arXiv 1909.08593, eq. 2; Stiennon et al. 2020.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]


# ----------------------------------------------------------------------------------------------
# masked statistics
# ----------------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, valid_mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over valid positions. `torch.where`, not `x * mask`, so NaN/inf in padding
    (e.g. from fully masked attention rows) cannot leak in as `0 * nan = nan`.

    Args:
        x: (b, t) values.
        valid_mask: (b, t) 1 where valid.
        dim: reduce over this dim, or everything when None.
    """
    x = torch.where(valid_mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, valid_mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over valid positions (all valid tokens pooled when `dim` is None)."""
    count = valid_mask.sum() if dim is None else valid_mask.sum(dim)
    return masked_sum(x, valid_mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, valid_mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all valid positions, with Bessel's correction by default.

    Args:
        x: (b, t) values.
        valid_mask: (b, t) 1 where valid.
    Returns:
        () scalar variance.
    """
    mean = masked_mean(x, valid_mask)
    var = masked_mean((x - mean) ** 2, valid_mask)
    if unbiased:
        n = valid_mask.sum()
        # var_unbiased = var * n / (n - 1); one valid value has no spread to correct.
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(
    x: torch.Tensor, valid_mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over valid positions.

    Padding comes back as 0 so that it cannot pollute later sums.

    Args:
        x: (b, t) values, e.g. advantages.
        valid_mask: (b, t) 1 where valid.
    Returns:
        (b, t) whitened values; 0 at padding.
    """
    mean = masked_mean(x, valid_mask)
    var = masked_var(x, valid_mask)
    # x_w = (x - mean) / sqrt(var + eps); without shift the mean is added back.
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid_mask.bool(), whitened, torch.zeros_like(whitened))


# ----------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL
# ----------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each chosen token.

    Args:
        logits: (b, t, v) unnormalised scores that predict `tokens`.
        tokens: (b, t) token ids.
    Returns:
        (b, t) log p(tokens_t | context).
    """
    # log p(x) = logit_x - logsumexp(logits); avoids a (b, t, v) log_softmax copy.
    chosen = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    Args:
        logits: (b, t, v).
    Returns:
        (b, t) H = logsumexp(l) - sum_v softmax(l)_v * l_v.
    """
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token only.

    With log r = logprobs - ref_logprobs for a token sampled from the policy:
    k1 = log r (unbiased, high variance, can be negative), k2 = (log r)^2 / 2 (biased, low
    variance, >= 0), k3 = (1/r - 1) + log r (unbiased, low variance, >= 0). Schulman 2020.

    Args:
        logprobs: (b, t) policy log-probs of the sampled tokens.
        ref_logprobs: (b, t) reference log-probs of the same tokens.
    Returns:
        (b, t) per-token KL estimate.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # k3 = (p_ref / p - 1) - log(p_ref / p) = exp(-log r) - 1 + log r
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3")


# ----------------------------------------------------------------------------------------------
# rewards and advantages
# ----------------------------------------------------------------------------------------------


def last_valid_index(valid_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (0 for an all-padding row).

    Args:
        valid_mask: (b, t) right-padded validity mask.
    Returns:
        (b,) long indices.
    """
    return (valid_mask.long().sum(-1) - 1).clamp(min=0)


def shaped_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float,
    valid_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every token plus the sequence score on the last one.

    r_t = -kl_coef * KL_t + [t == T] * score (Ziegler et al. 2019, eq. 2).

    Args:
        scores: (b,) scalar score of each completion from the reward model.
        kl: (b, t) per-token KL estimate.
        kl_coef: penalty coefficient beta.
        valid_mask: (b, t) 1 where valid.
    Returns:
        (b, t) rewards, 0 at padding.
    """
    rewards = -kl_coef * kl
    last = last_valid_index(valid_mask)
    # r_T += score, placed on the last emitted token of each row
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))
    return torch.where(valid_mask.bool(), rewards, torch.zeros_like(rewards))


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    valid_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens (vectorised over the batch).

    The episode ends after the last valid token, so V_{T+1} = 0 there. Right padding must be the
    only padding: a valid token never follows an invalid one.

    Args:
        rewards: (b, t) per-token rewards.
        values: (b, t) value estimates V_t of the state before emitting token t.
        valid_mask: (b, t) 1 where valid.
        gamma: discount.
        lam: GAE lambda.
    Returns:
        advantages (b, t) and returns (b, t) = advantages + values, both 0 at padding.
    """
    valid = valid_mask.to(values.dtype)
    values = torch.where(valid_mask.bool(), values, torch.zeros_like(values))
    rewards = torch.where(valid_mask.bool(), rewards, torch.zeros_like(rewards))
    t_len = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(t_len)):
        next_value = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(values[:, 0])
        # delta_t = r_t + gamma * V_{t+1} - V_t   (V of padding is 0: the episode has ended)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = delta_t + gamma * lambda * A_{t+1}
        last_gae = (delta + gamma * lam * last_gae) * valid[:, t]
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective, as a per-token loss to be summed (PPO eq. 7).

    Args:
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b, t).
        valid_mask: (b, t).
        cliprange: epsilon.
    Returns:
        loss_per_token (b, t) with 0 at padding; clipped (b, t) bool: where the clipped term won;
        ratio (b, t).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    # L^CLIP = -min(r A, clip(r, 1-eps, 1+eps) A) = max(-r A, -clip(r) A)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(valid_mask.bool(), loss, torch.zeros_like(loss))
    return loss, (clipped > unclipped) & valid_mask.bool(), ratio


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, as a per-token loss to be summed (the PPO2 baselines variant).

    Args:
        values: (b, t) current value predictions.
        old_values: (b, t) value predictions at rollout time.
        returns: (b, t) GAE returns (targets).
        valid_mask: (b, t).
        cliprange_value: how far the value may move from `old_values` before clipping.
    Returns:
        loss_per_token (b, t), 0 at padding; clipped (b, t) bool: where the clipped term won.
    """
    # V_clip = V_old + clip(V - V_old, -c, c)
    values_clipped = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    # L^V = 1/2 max((V - R)^2, (V_clip - R)^2)
    err_unclipped = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(err_unclipped, err_clipped)
    loss = torch.where(valid_mask.bool(), loss, torch.zeros_like(loss))
    return loss, (err_clipped > err_unclipped) & valid_mask.bool()


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, valid_mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid tokens: 1 is a perfect critic, <= 0 a useless one."""
    return 1.0 - masked_var(returns - values, valid_mask) / masked_var(returns, valid_mask).clamp(
        min=1e-8
    )


# ----------------------------------------------------------------------------------------------
# preference (reward) models
# ----------------------------------------------------------------------------------------------


def preference_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Bradley-Terry loss with soft labels, mean over pairs.

    P(chosen > rejected) = sigmoid(r_c - r_r) (Bradley & Terry 1952; Ouyang et al. 2022,
    arXiv 2203.02155, eq. 1). A soft label l in [0, 1] (AI feedback, Bai et al. 2022,
    arXiv 2212.08073) is the target probability, so the loss is the binary cross-entropy
    -(l log sigma(r_c - r_r) + (1 - l) log sigma(r_r - r_c)); l = 1 is the usual hard loss.

    Args:
        chosen_rewards: (b,) scalar rewards of the chosen texts.
        rejected_rewards: (b,) scalar rewards of the rejected texts.
        labels: (b,) probability that chosen is preferred.
    """
    margin = chosen_rewards - rejected_rewards
    # -(l * logsig(m) + (1 - l) * logsig(-m))
    return -(labels * F.logsigmoid(margin) + (1 - labels) * F.logsigmoid(-margin)).mean()
