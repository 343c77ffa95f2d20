"""The loss of a PPO mini-batch: pure tensor functions, no I/O, no config, no `.item()`.

The policy losses (PPO's clipped surrogate, GSPO, CISPO, SAPO), per token or per completion,
their aggregation over tokens and completions, the clipped value loss, and `rl_loss`, which adds
them up with the KL term. Notation as in `tether.ppo`: `b` = batch (sequences), `t` = response
tokens; `valid_mask` (b, t) is 1 for tokens the policy emitted.

Sources:
- PPO clipped objective: Schulman et al. 2017, arXiv 1707.06347, eq. 7.
- The per-sequence token-mean loss: GRPO, Shao et al. 2024, arXiv 2402.03300, sec. 4.1; with a
  constant normaliser: Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, sec. 3.1; the token-level
  (token-mean) loss and clip-higher (a separate, larger upper clip): DAPO, Yu et al. 2025,
  arXiv 2503.14476, sec. 3.1 and 3.3.
- The sequence-level importance ratio: GSPO, Zheng et al. 2025, arXiv 2507.18071, sec. 4.1.
- The clipped, stop-gradient importance weight on a REINFORCE term: CISPO, MiniMax-M1, MiniMax
  2025, arXiv 2506.13585, sec. 3.1.
- The soft, temperature-controlled gate in place of the clip: SAPO, arXiv 2511.20347.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from tether.ppo import masked_mean, masked_sum, masked_var

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PolicyLossKind = Literal["clip", "gspo", "cispo", "sapo"]


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
