"""PPO math for language models: pure tensor functions, no I/O, no config, no `.item()`.

Notation: `b` = batch (sequences), `t` = response tokens, `v` = vocabulary. Every per-token tensor
is aligned with the response: position `t` is the `t`-th generated token, and `valid_mask` (b, t)
is 1 for tokens the policy actually emitted (up to and including its EOS) and 0 for padding.

Sources:
- PPO clipped objective: Schulman et al. 2017, arXiv 1707.06347, eq. 7.
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
- Clip-higher (a separate, larger upper clip), dynamic sampling and soft overlong punishment:
  DAPO, Yu et al. 2025, arXiv 2503.14476, sec. 3.1, 3.2 and 3.4 (eq. 13).
- The sequence-level importance ratio: GSPO, Zheng et al. 2025, arXiv 2507.18071, sec. 4.1.
- The clipped, stop-gradient importance weight on a REINFORCE term: CISPO, MiniMax-M1, MiniMax
  2025, arXiv 2506.13585, sec. 3.1.
- The soft, temperature-controlled gate in place of the clip: SAPO, arXiv 2511.20347.
- The importance-weighted k3 in the loss (an unbiased gradient of KL(policy || reference) on
  samples of an older policy): DeepSeek-V3.2, arXiv 2512.02556; TRL's `use_bias_correction_kl`.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3", "full"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PolicyLossKind = Literal["clip", "gspo", "cispo", "sapo"]


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
# losses
# ----------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective, as a per-token loss to be summed (PPO eq. 7), with DAPO's
    clip-higher when `cliprange_high` differs from `cliprange` (Yu et al. 2025, sec. 3.1).

    Args:
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b, t).
        valid_mask: (b, t).
        cliprange: epsilon (epsilon_low with clip-higher).
        cliprange_high: epsilon_high; None: = cliprange.
    Returns:
        loss_per_token (b, t) with 0 at padding; clipped (b, t) bool: where the clipped term won;
        ratio (b, t).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    loss, clipped = clipped_surrogate(ratio, advantages, cliprange, cliprange_high)
    loss = torch.where(valid_mask.bool(), loss, torch.zeros_like(loss))
    return loss, clipped & valid_mask.bool(), ratio


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective as a loss, elementwise (eq. 7), for any shape of ratio; the upper
    bound is 1 + `cliprange_high` when given (DAPO's clip-higher), else 1 + `cliprange`.

    Returns:
        loss, and where the clipped term won (bool), both shaped like `ratio`.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    # L^CLIP = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) = max(-r A, -clip(r) A)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO's clipped objective on a sequence-level ratio, the geometric mean of the token ratios
    (Zheng et al. 2025, sec. 4.1; TRL's `importance_sampling_level="sequence"`).

    s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|) = exp((1 / |y_i|) sum_t log(pi(y_t) / pi_old(y_t)))
    L_i = max(-s_i A_i, -clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    Unlike RLOO's `sequence_policy_loss` (the product of the ratios), the length normalisation
    keeps s_i near 1 whatever the length, so one clip range fits every completion.

    Args:
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b,) one per completion.
        valid_mask: (b, t).
        cliprange: epsilon_low.
        cliprange_high: epsilon_high; None: = cliprange.
    Returns:
        loss_per_sequence (b,); clipped (b,) bool; ratio s (b,).
    """
    # log s_i = masked mean over the completion of log pi - log pi_old
    ratio = torch.exp(masked_mean(logprobs - old_logprobs, valid_mask, dim=1))
    loss, clipped = clipped_surrogate(ratio, advantages, cliprange, cliprange_high)
    return loss, clipped, ratio


def cispo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585, sec. 3.1; TRL's `loss_type="cispo"`): REINFORCE's
    log-prob term weighted by the importance ratio, truncated above and without gradient.

    w_t = sg(min(r_t, 1 + eps_high)), L_t = -w_t A_t log pi(y_t)

    PPO's clip zeroes the gradient of a token whose ratio left the trust region (often the rare,
    high-entropy "fork" tokens); here every token keeps its gradient, only its weight is capped.
    No lower bound, as in the paper (a large eps_low) and TRL. TRL's `epsilon_high` is the cap
    itself (its ScaleRL-recommended 5.0 is `cliprange_high` 4.0 here).

    Args:
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b, t).
        valid_mask: (b, t).
        cliprange_high: eps_high: the weight is capped at 1 + eps_high.
    Returns:
        loss_per_token (b, t) with 0 at padding; truncated (b, t) bool: where the weight was
        capped; ratio (b, t).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    cap = 1.0 + cliprange_high
    # w_t = sg(min(r_t, 1 + eps_high))
    weight = torch.clamp(ratio, max=cap).detach()
    # L_t = -w_t A_t log pi(y_t)
    loss = -weight * advantages * logprobs
    valid = valid_mask.bool()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, (ratio > cap) & valid, ratio


def sapo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    temperature_pos: float = 1.0,
    temperature_neg: float = 1.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAPO's soft gate in place of the hard clip (arXiv 2511.20347; TRL's `loss_type="sapo"`,
    whose default temperatures these are).

    f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos if A > 0 else tau_neg
    L_t = -f(r_t) A_t

    f'(r) = 4 sigma (1 - sigma): 1 at r = 1 (the on-policy gradient is the plain policy
    gradient's), falling smoothly as r leaves 1 either way instead of dropping to 0 at a clip
    edge; a larger tau narrows the gate (negative advantages get the narrower one by default).

    Args:
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b, t).
        valid_mask: (b, t).
        temperature_pos: tau for tokens with A > 0.
        temperature_neg: tau for tokens with A <= 0.
    Returns:
        loss_per_token (b, t) with 0 at padding; clipped (b, t) bool, all False (nothing is
        clipped); ratio (b, t).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg)
    # f(r) = (4 / tau) sigmoid(tau (r - 1))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    loss = -gate * advantages
    valid = valid_mask.bool()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, torch.zeros_like(valid), ratio


def token_policy_loss(
    kind: PolicyLossKind,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen policy loss as a per-token loss to aggregate: `clip` (PPO's surrogate, with
    clip-higher), `gspo` (a completion's loss on each of its tokens, as TRL broadcasts it),
    `cispo` or `sapo`.

    Args:
        kind: clip, gspo, cispo or sapo.
        logprobs: (b, t) log-probs under the policy being updated.
        old_logprobs: (b, t) log-probs under the policy that sampled the tokens.
        advantages: (b, t); gspo reads each row's first (a completion's one advantage).
        valid_mask: (b, t).
        cliprange: epsilon_low (unused by cispo and sapo).
        cliprange_high: epsilon_high; None: = cliprange.
        sapo_temperatures: sapo's (tau_pos, tau_neg).
    Returns:
        loss_per_token (b, t), 0 at padding; clipped (b, t) bool: where the ratio was clipped
        (gspo: the completion's; cispo: where the weight was capped; sapo: nowhere).
    """
    high = cliprange if cliprange_high is None else cliprange_high
    valid = valid_mask.bool()
    if kind == "clip":
        loss, clipped, _ = policy_loss(
            logprobs, old_logprobs, advantages, valid_mask, cliprange, high
        )
        return loss, clipped
    if kind == "gspo":
        seq_loss, seq_clipped, _ = gspo_policy_loss(
            logprobs, old_logprobs, advantages[:, 0], valid_mask, cliprange, high
        )
        # every token of completion i carries L_i (aggregation then weighs completions)
        loss = torch.where(valid, seq_loss[:, None], torch.zeros_like(logprobs))
        return loss, seq_clipped[:, None] & valid
    if kind == "cispo":
        loss, clipped, _ = cispo_policy_loss(logprobs, old_logprobs, advantages, valid_mask, high)
        return loss, clipped
    if kind == "sapo":
        loss, clipped, _ = sapo_policy_loss(
            logprobs, old_logprobs, advantages, valid_mask, *sapo_temperatures
        )
        return loss, clipped
    raise ValueError(f"unknown policy loss {kind!r}; expected one of clip, gspo, cispo, sapo")


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid_mask: torch.Tensor,
    cliprange: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate with the whole completion as one action (RLOO, Ahmadian et al. 2024,
    sec. 3: "we model the entire generation as a single action"), as TRL's RLOOTrainer has it.

    r_i = exp(sum_t (log pi(y_t) - log pi_old(y_t))); L_i = max(-r_i A_i, -clip(r_i, 1-eps, 1+eps) A_i)

    Args:
        logprobs: (b, t).
        old_logprobs: (b, t).
        advantages: (b,) one per completion.
        valid_mask: (b, t).
        cliprange: epsilon (epsilon_low with clip-higher).
        cliprange_high: epsilon_high; None: = cliprange.
    Returns:
        loss_per_sequence (b,); clipped (b,) bool; ratio (b,).
    """
    ratio = torch.exp(masked_sum(logprobs - old_logprobs, valid_mask, dim=1))
    loss, clipped = clipped_surrogate(ratio, advantages, cliprange, cliprange_high)
    return loss, clipped, ratio


def aggregate_loss(
    loss: torch.Tensor,
    valid_mask: torch.Tensor,
    mode: LossAggregation,
    n_tokens: torch.Tensor | float | None = None,
    n_sequences: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar that is differentiated.

    - `token-mean`: sum over every valid token / their count (DAPO's token-level loss; tether's
      PPO always did this);
    - `seq-mean-token-mean`: each sequence's token mean, averaged over sequences (GRPO as Shao et
      al. 2024 write it, eq. 3: longer completions weigh less per token);
    - `seq-mean-token-sum-norm`: sum over every valid token / (sequences x max_len), a constant
      (Dr. GRPO, Liu et al. 2025, sec. 3.1, TRL's `dr_grpo`).

    The normalisers default to this batch's own; a micro-batch of a larger mini-batch passes the
    mini-batch's (`n_tokens`, `n_sequences`), so that the accumulated gradient is the mini-batch's.

    Args:
        loss: (b, t) per-token loss (0 at padding is not required).
        valid_mask: (b, t) 1 where the token counts.
        mode: one of the three above.
        n_tokens: valid tokens of the whole (mini-)batch.
        n_sequences: sequences of the whole (mini-)batch.
        max_len: the constant of `seq-mean-token-sum-norm` (max new tokens).
    Returns:
        () scalar loss.
    """
    n_sequences = loss.shape[0] if n_sequences is None else n_sequences
    if mode == "token-mean":
        n_tokens = valid_mask.sum().clamp(min=1) if n_tokens is None else n_tokens
        return masked_sum(loss, valid_mask) / n_tokens
    if mode == "seq-mean-token-mean":
        # (1 / n) sum_i (1 / |y_i|) sum_t l_{i,t}
        per_seq = masked_sum(loss, valid_mask, dim=1) / valid_mask.sum(1).clamp(min=1)
        return per_seq.sum() / n_sequences
    if mode == "seq-mean-token-sum-norm":
        max_len = loss.shape[1] if max_len is None else max_len
        # (1 / (n * L)) sum_i sum_t l_{i,t}
        return masked_sum(loss, valid_mask) / (n_sequences * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


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


def rl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cliprange: float,
    aggregation: LossAggregation | None,
    n_tokens: torch.Tensor | float,
    n_sequences: int,
    max_len: int,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    policy_loss_kind: PolicyLossKind = "clip",
    cliprange_high: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one (micro-)batch, for every estimator: the policy loss (PPO's clipped
    surrogate, or GSPO / CISPO / SAPO's, `token_policy_loss`), plus the KL penalty when it goes
    in the loss (GRPO, Shao et al. 2024, eq. 3), plus the clipped value loss when there is a
    critic.

    L = agg(L^pi_t + beta * KL_t) + vf_coef * token-mean(L^V_t); with `aggregation` None the
    whole completion is one action (RLOO): L = sum_i L^CLIP_i / n_sequences.

    Args:
        logprobs: (b, t) log-probs under the policy being updated (carry the gradient).
        old_logprobs: (b, t) log-probs at rollout time.
        advantages: (b, t); a sequence-level estimator repeats its advantage on every token.
        loss_mask: (b, t) 1 where a token enters the loss.
        cliprange: epsilon (epsilon_low with clip-higher).
        aggregation: see `aggregate_loss`; None: sequence-level ratio (`sequence_policy_loss`,
            `clip` only).
        n_tokens: the mini-batch's valid-token count (the whole mini-batch's normaliser).
        n_sequences: its completion count.
        max_len: its padded completion length.
        kl: (b, t) per-token KL of the policy being updated to the reference, None: not in
            the loss.
        kl_coef: beta.
        values: (b, t) for the value loss, None without a critic.
        old_values: (b, t) the values at rollout time, None without a critic.
        returns: (b, t) the value targets, None without a critic.
        policy_loss_kind: clip, gspo, cispo or sapo (`token_policy_loss`).
        cliprange_high: epsilon_high (clip, gspo; cispo's cap 1 + epsilon_high); None: = cliprange.
        sapo_temperatures: sapo's (tau_pos, tau_neg).
    Returns:
        the scalar loss and detached diagnostics as () tensors (each a share of the mini-batch's
        value: micro-batches' diagnostics add up): policy_loss, clipfrac, approx_kl, and
        kl_loss / value_loss / vf_clipfrac where those terms exist.
    """
    agg = functools.partial(
        aggregate_loss,
        valid_mask=loss_mask,
        n_tokens=n_tokens,
        n_sequences=n_sequences,
        max_len=max_len,
    )
    if aggregation is None:
        # advantages[:, 0]: the completion's one advantage (the first token is always emitted)
        if policy_loss_kind != "clip":
            raise ValueError(f"a sequence-level action takes the clip loss, not {policy_loss_kind}")
        pg_seq, clipped_seq, _ = sequence_policy_loss(
            logprobs, old_logprobs, advantages[:, 0], loss_mask, cliprange, cliprange_high
        )
        kept = loss_mask.any(1)
        pg_loss = torch.where(kept, pg_seq, torch.zeros_like(pg_seq)).sum() / n_sequences
        clipfrac = (clipped_seq & kept).float().sum() / n_sequences
    else:
        pg, clipped = token_policy_loss(
            policy_loss_kind,
            logprobs,
            old_logprobs,
            advantages,
            loss_mask,
            cliprange,
            cliprange_high,
            sapo_temperatures,
        )
        pg_loss = agg(pg, mode=aggregation)
        clipfrac = agg(clipped.float(), mode="token-mean")
    loss = pg_loss
    with torch.no_grad():
        # approx KL(old || new) ~ 1/2 (log r)^2, the k2 estimator
        approx_kl = agg(0.5 * (logprobs - old_logprobs) ** 2, mode="token-mean")
    stats = {"policy_loss": pg_loss.detach(), "clipfrac": clipfrac.detach(), "approx_kl": approx_kl}
    if kl is not None:
        kl_loss = agg(kl, mode=aggregation or "token-mean")
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    if values is not None:
        vf, vf_clipped = value_loss(values, old_values, returns, loss_mask, cliprange_value)
        vf_loss = agg(vf, mode="token-mean")
        loss = loss + vf_coef * vf_loss
        stats["value_loss"] = vf_loss.detach()
        stats["vf_clipfrac"] = agg(vf_clipped.float(), mode="token-mean").detach()
    return loss, stats


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
