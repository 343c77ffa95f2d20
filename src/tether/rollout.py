"""Typed containers that carry rollouts through a PPO step.

Layout, for causal and seq2seq alike: prompts are a padded (b, p) block with `prompt_mask`;
responses are a right-padded (b, t) block with `valid_mask`, 1 for every token the policy emitted
up to and including its first EOS. Every per-token tensor in `Experience` is (b, t), aligned with
the response. Masks name their polarity: 1 = keep.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def step_seed(seed: int, step: int) -> int:
    """The torch seed of sampling batch `step` (a PPO step, an evaluation or generation batch):
    derived from (seed, step) alone, so a resumed run samples exactly what an uninterrupted one
    would have, and two policies evaluated on the same prompts draw the same random stream."""
    return (seed * 1_000_003 + step) % (2**63)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding for rollouts. PPO's ratios assume samples come from softmax(logits / temperature);
    top-k / top-p truncate that distribution, so leave them off unless you mean it."""

    max_new_tokens: int = 48
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True


@dataclass
class Rollout:
    """What the policy generated for a batch of prompts.

    Fields:
        prompt_ids: (b, p) prompt tokens, left-padded for causal models.
        prompt_mask: (b, p) 1 for real prompt tokens.
        response_ids: (b, t) generated tokens, right-padded.
        valid_mask: (b, t) 1 for generated tokens up to and including the first EOS.
        prompts: the b prompt texts as the reward sees them (before any chat template).
        completions: the b decoded responses (special tokens removed).
        finished: (b,) bool, True where the response ended with EOS (False: cut at max_new_tokens).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    valid_mask: torch.Tensor
    prompts: list[str]
    completions: list[str]
    finished: torch.Tensor

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def rows_by_length(self) -> torch.Tensor:
        """(b,) row indices ordered by real (unpadded) prompt + response length: chunks of
        neighbours pad little."""
        lengths = self.prompt_mask.sum(-1) + self.valid_mask.sum(-1)
        return torch.argsort(lengths, stable=True)

    def select(self, idx: torch.Tensor) -> Rollout:
        """Rows `idx`, with padding columns that no selected row uses trimmed away."""
        idx_list = idx.tolist()
        prompt_keep = self.prompt_mask[idx].bool().any(0)
        t = int(self.valid_mask[idx].sum(-1).max().clamp(min=1))
        return Rollout(
            prompt_ids=self.prompt_ids[idx][:, prompt_keep],
            prompt_mask=self.prompt_mask[idx][:, prompt_keep],
            response_ids=self.response_ids[idx, :t],
            valid_mask=self.valid_mask[idx, :t],
            prompts=[self.prompts[i] for i in idx_list],
            completions=[self.completions[i] for i in idx_list],
            finished=self.finished[idx],
        )


def pad_cat(tensors: list[torch.Tensor], value: float, left: bool = False) -> torch.Tensor:
    """(b_i, t_i) blocks stacked into one (sum b_i, max t_i), each padded with `value` on the
    right (on the left with `left`)."""
    width = max(x.shape[1] for x in tensors)
    padded = []
    for x in tensors:
        pad = x.new_full((x.shape[0], width - x.shape[1]), value)
        padded.append(torch.cat([pad, x] if left else [x, pad], dim=1))
    return torch.cat(padded)


def cat_rollouts(rollouts: list[Rollout], pad_token_id: int, left_pad_prompts: bool) -> Rollout:
    """The rows of several rollouts as one (dynamic sampling's rounds): prompts re-padded on the
    side the policy pads them (left for causal models), responses on the right."""
    return Rollout(
        prompt_ids=pad_cat([r.prompt_ids for r in rollouts], pad_token_id, left_pad_prompts),
        prompt_mask=pad_cat([r.prompt_mask for r in rollouts], 0, left_pad_prompts),
        response_ids=pad_cat([r.response_ids for r in rollouts], pad_token_id),
        valid_mask=pad_cat([r.valid_mask for r in rollouts], 0),
        prompts=[p for r in rollouts for p in r.prompts],
        completions=[c for r in rollouts for c in r.completions],
        finished=torch.cat([r.finished for r in rollouts]),
    )


@dataclass
class Experience:
    """A scored rollout with everything the update needs. All tensors (b, t) unless noted.

    Fields:
        rollout: the generated batch.
        old_logprobs: policy log-probs of the response tokens at rollout time.
        ref_logprobs: reference (starting policy) log-probs of the same tokens.
        old_values: value estimates at rollout time (None without a critic).
        scores: (b,) the scores the update saw (normalised, length-penalised as configured).
        kl: per-token KL of the rollout policy to the reference (the penalised quantity).
        rewards: per-token rewards: the score on the last token, minus the KL penalty on every
            token when the KL goes in the reward.
        advantages: per token; a sequence-level estimator's advantage sits on every token of
            its completion.
        returns: value targets (None without a critic).
        loss_mask: 1 where a token enters the loss: `valid_mask`, less truncated completions
            when those are masked out.
    """

    rollout: Rollout
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.rollout)

    def select(self, idx: torch.Tensor) -> Experience:
        """Rows `idx` (a mini-batch), response columns trimmed like `Rollout.select`."""
        rollout = self.rollout.select(idx)
        t = rollout.response_ids.shape[1]
        per_token = {
            f.name: getattr(self, f.name)[idx, :t]
            for f in fields(self)
            if f.name not in ("rollout", "scores") and getattr(self, f.name) is not None
        }
        return replace(self, rollout=rollout, scores=self.scores[idx], **per_token)


def response_valid_mask(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for each generated token up to and including the first EOS, 0 after it.

    Args:
        response_ids: (b, t) generated tokens (generation pads finished rows with pad = often EOS).
        eos_token_ids: ids that end a response.
    Returns:
        (b, t) long mask.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    # number of EOS strictly before position t; a token is valid while that count is 0
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()
