"""PPO math for language models: pure tensor functions, no I/O, no config, no `.item()`.

This module holds the masked statistics, log-probs and the KL estimators, and the rewards and
advantages of every estimator; `tether.losses` builds a mini-batch's loss from them.

Notation: `b` = batch (sequences), `t` = response tokens, `v` = vocabulary. Every per-token tensor
is aligned with the response: position `t` is the `t`-th generated token, and `valid_mask` (b, t)
is 1 for tokens the policy actually emitted (up to and including its EOS) and 0 for padding.

Sources:
- GAE: Schulman et al. 2015, arXiv 1506.02438, eq. 16.
- KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence" (2020), joschu.net/blog/kl-approx.html.
- Per-token KL-shaped reward: Ziegler et al. 2019, arXiv 1909.08593, eq. 2; Stiennon et al. 2020.
- GRPO group-relative advantages and the per-sequence token-mean loss: Shao et al. 2024,
  arXiv 2402.03300, sec. 4.1; without the std and with a constant normaliser: Dr. GRPO, Liu et al.
  2025, arXiv 2503.20783, sec. 3.1; the token-level (token-mean) loss: DAPO, Yu et al. 2025,
  arXiv 2503.14476, sec. 3.3.
- RLOO's leave-one-out baseline and its sequence-level action: Ahmadian et al. 2024, arXiv
  2402.14740, sec. 3.
- REINFORCE++ (token-level KL in the reward, returns normalised over the batch): Hu 2025, arXiv
  2501.03262, sec. 3.
- Dynamic sampling and soft overlong punishment: DAPO, Yu et al. 2025, arXiv 2503.14476,
  sec. 3.2 and 3.4 (eq. 13).
- The importance-weighted k3 in the loss (an unbiased gradient of KL(policy || reference) on
  samples of an older policy): DeepSeek-V3.2, arXiv 2512.02556; TRL's `use_bias_correction_kl`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3", "full"]


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


def importance_weighted_k3(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor
) -> torch.Tensor:
    """k3 weighted by the differentiable importance ratio pi / pi_old: the KL term of the loss
    whose gradient is unbiased for grad KL(pi || pi_ref) on tokens an older policy sampled
    (TRL's `use_bias_correction_kl`; DeepSeek-V3.2, arXiv 2512.02556).

    Why: plain k3 = q/pi - 1 - log(q/pi) (q = pi_ref) has grad k3 = (1 - q/pi) grad log pi, whose
    mean under pi is sum_y (pi - q) grad log pi = -sum_y q grad log pi = grad KL(q || pi): the
    other KL. With r = pi / pi_old, grad(r k3) = r (k3 grad log pi + grad k3), and
    E_old[r f] = E_pi[f], so its mean is sum_y (grad pi) k3 + pi grad k3 = grad E_pi[k3] =
    grad KL(pi || q), as E_pi[k3] = KL(pi || q) exactly. Its value at r = 1 is k3's.

    Args:
        logprobs: (b, t) log-probs under the policy being updated (carry the gradient).
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        ref_logprobs: (b, t) reference log-probs of the same tokens.
    Returns:
        (b, t) r_t * k3_t.
    """
    # r_t = pi(y_t) / pi_old(y_t), differentiable
    ratio = torch.exp(logprobs - old_logprobs)
    # KL_t = r_t * ((q / pi) - 1 - log(q / pi))
    return ratio * kl_estimate(logprobs, ref_logprobs, "k3")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Exact per-token KL(policy || reference) over the whole vocabulary, not an estimate.

    KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)), p = softmax(logits), q = softmax(ref_logits).
    The positions are taken `chunk_size` at a time, so the (b, t, v) log-softmax copies of both
    distributions never all live at once (each chunk makes (chunk_size, v) ones). Gradients flow
    into `logits` (KL in the loss); `ref_logits` should carry none.

    Args:
        logits: (b, t, v) policy logits (already divided by the sampling temperature).
        ref_logits: (b, t, v) reference logits, same scaling.
        chunk_size: positions per chunk.
    Returns:
        (b, t) KL >= 0 at every position (padding included: mask it afterwards).
    """
    b, t, v = logits.shape
    flat, ref_flat = logits.reshape(b * t, v), ref_logits.reshape(b * t, v)
    out = []
    for start in range(0, b * t, chunk_size):
        log_p = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        log_q = torch.log_softmax(ref_flat[start : start + chunk_size].float(), dim=-1)
        # KL(p || q) = sum_v p_v (log p_v - log q_v)
        out.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return torch.cat(out).reshape(b, t) if out else logits.new_zeros(b, t)


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


def discounted_returns(
    rewards: torch.Tensor, valid_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Reward-to-go of every response token: G_t = sum_{s >= t} gamma^(s - t) r_s.

    Args:
        rewards: (b, t) per-token rewards (0 at padding).
        valid_mask: (b, t) 1 where valid (right padding only).
        gamma: discount.
    Returns:
        (b, t) returns, 0 at padding.
    """
    rewards = torch.where(valid_mask.bool(), rewards, torch.zeros_like(rewards))
    running = torch.zeros_like(rewards[:, 0])
    returns_reversed = []
    for t in reversed(range(rewards.shape[1])):
        # G_t = r_t + gamma * G_{t+1}
        running = rewards[:, t] + gamma * running
        returns_reversed.append(running)
    returns = torch.stack(returns_reversed[::-1], dim=1)
    return torch.where(valid_mask.bool(), returns, torch.zeros_like(returns))


def reinforce_pp_advantages(
    rewards: torch.Tensor, valid_mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262, sec. 3): the advantage of token t is its return
    under the KL-shaped token rewards, normalised over every valid token of the batch.

    A_t = (G_t - mean(G)) / std(G), G_t = sum_{s >= t} gamma^(s-t) r_s, r_s = -beta KL_s + [s = T] score.

    Args:
        rewards: (b, t) KL-shaped per-token rewards (`shaped_rewards`).
        valid_mask: (b, t).
        gamma: discount (1 in the paper).
    Returns:
        (b, t) advantages, 0 at padding.
    """
    return masked_whiten(discounted_returns(rewards, valid_mask, gamma), valid_mask)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's group-relative advantage of each completion (Shao et al. 2024, sec. 4.1.2).

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4), the std with Bessel's correction and the
    1e-4 as TRL's GRPOTrainer has them; `scale=False` keeps only the mean (Dr. GRPO, Liu et al.
    2025: dividing by the std weights easy and hard prompts unequally).

    Args:
        scores: (b,) sequence rewards, `group_size` consecutive completions per prompt.
        group_size: G >= 2.
        scale: divide by the group's std.
    Returns:
        (b,) advantages.
    """
    grouped = scores.view(-1, group_size)  # (b / G, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: each completion's reward minus the mean of its G - 1 siblings'
    (Ahmadian et al. 2024, sec. 3.2; Kool et al. 2019).

    A_i = r_i - (sum_j r_j - r_i) / (G - 1)

    Args:
        scores: (b,) sequence rewards, `group_size` consecutive completions per prompt.
        group_size: G >= 2.
    Returns:
        (b,) advantages.
    """
    grouped = scores.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def constant_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups' completions all scored the same: their group-relative advantages are all 0,
    so they carry no gradient (DAPO's dynamic sampling, Yu et al. 2025, sec. 3.2, drops them:
    keep a group only if 0 < |{i : r_i = r_max}| < G, i.e. its scores have a spread).

    Args:
        scores: (b,) the scores the advantages see, `group_size` consecutive completions per
            prompt.
        group_size: G.
    Returns:
        (b / G,) bool, True where every score of the group equals its first.
    """
    grouped = scores.view(-1, group_size)  # (b / G, G)
    return (grouped == grouped[:, :1]).all(dim=1)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, sec. 3.4, eq. 13): 0 up to
    L_max - L_cache tokens, then falling linearly to -1 at L_max, and -1 beyond.

    R_length(y) = 0                                    if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                = -1                                   if |y| > L_max

    Args:
        lengths: (b,) completion lengths |y| in tokens (EOS included), integer or float.
        max_len: L_max (max new tokens).
        buffer_len: L_cache, 1 <= L_cache <= L_max.
    Returns:
        (b,) penalties in [-1, 0] (float32 for integer lengths, else their dtype).
    """
    lengths = lengths if lengths.is_floating_point() else lengths.float()
    free = max_len - buffer_len  # L_max - L_cache
    # ((L_max - L_cache) - |y|) / L_cache, 0 while |y| <= L_max - L_cache
    penalty = (free - lengths).clamp(max=0.0) / buffer_len
    return penalty.clamp(min=-1.0)  # -1 past L_max


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
