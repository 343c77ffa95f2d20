"""tether.ppo's GRPO / RLOO estimators and losses against TRL 1.16 as the oracle.

TRL computes these inside trainer methods, so the oracle tests build real `GRPOTrainer` /
`RLOOTrainer`s on the tiny random Llama of conftest (one per configuration, module-scoped) and
drive the methods on identical inputs:

- advantages: `_generate_and_score_completions` on a prompt batch, with a reward function that
  returns fixed, predetermined rewards (the sampled text is irrelevant to them);
- losses: `_compute_loss(model, inputs)` on a hand-built batch, against tether's per-token loss on
  the same model's log-probs, for the value and for the gradient of every parameter.

The rest are small hand-computed unit tests (derivations in the comments).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT_WORDS
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from tether import losses, ppo

G = 4  # completions per prompt
# Four groups of four fixed rewards: a generic group, one with ties, one whose spread (std 5e-5) is
# below the 1e-4 epsilon, so where the epsilon sits (std + eps vs sqrt(var + eps)) and which std
# (unbiased vs biased) is used change the advantages by far more than the tolerance, and a constant
# group (zero std: advantage 0).
REWARDS = [1.0, 0.0, 0.5, 2.0, -1.0, 3.0, 3.0, 0.25, 0.0, 0.0, 0.0, 1e-4, 0.7, 0.7, 0.7, 0.7]
N = len(REWARDS)
PROMPTS = PROMPT_WORDS[: N // G]
MAX_COMPLETION = 6  # TRL's max_completion_length; the hand-built loss batch is narrower (T = 5)
CLIP = 0.2  # TRL's default epsilon (= epsilon_high when that is unset)


def fixed_rewards(prompts, completions, **kwargs):
    """The predetermined rewards, in batch order, whatever was generated."""
    assert len(completions) == N
    return list(REWARDS)


def _prompt_batch() -> list[dict]:
    # what TRL's RepeatSampler hands the trainer: each prompt G times in a row
    return [{"prompt": p} for p in PROMPTS for _ in range(G)]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def _common_args(tmp_path_factory, **kw) -> dict:
    return dict(
        output_dir=str(tmp_path_factory.mktemp("trl-out")),
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_completion_length=MAX_COMPLETION,
        num_generations=G,
        per_device_train_batch_size=N,
        save_strategy="no",
        **kw,
    )


@pytest.fixture(scope="module")
def make_trainer(tiny_llama, tokenizer, tmp_path_factory):
    """`make_trainer(GRPOTrainer|RLOOTrainer, **config)`: one trainer per configuration for the
    module, put in train mode with `current_gradient_accumulation_steps` set as HF's training loop
    sets it (= the config's gradient_accumulation_steps)."""
    cache = {}
    dataset = Dataset.from_dict({"prompt": PROMPTS})

    def make(trainer_cls, **kw):
        key = (trainer_cls.__name__, tuple(sorted(kw.items())))
        if key not in cache:
            config_cls = GRPOConfig if trainer_cls is GRPOTrainer else RLOOConfig
            args = config_cls(**_common_args(tmp_path_factory, **kw))
            torch.manual_seed(0)
            trainer = trainer_cls(
                model=str(tiny_llama),
                reward_funcs=fixed_rewards,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
            )
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
            cache[key] = trainer
        return cache[key]

    return make


# ----------------------------------------------------------------------------------------------
# advantages: TRL's _generate_and_score_completions on fixed rewards
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_rewards, scale", [("group", True), ("none", False)])
def test_grpo_advantages_match_trl(make_trainer, scale_rewards, scale):
    trainer = make_trainer(GRPOTrainer, beta=0.0, scale_rewards=scale_rewards)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(_prompt_batch())
    ours = ppo.group_advantages(torch.tensor(REWARDS), G, scale=scale)
    torch.testing.assert_close(ours, out["advantages"], rtol=1e-5, atol=1e-6)
    if scale:
        # the tiny-spread group is really scaled: (1e-4 - 2.5e-5) / (5e-5 + 1e-4) = 0.5
        assert ours[11].item() == pytest.approx(0.5, abs=1e-3)


def test_rloo_advantages_match_trl_without_kl(make_trainer):
    trainer = make_trainer(RLOOTrainer, beta=0.0)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(_prompt_batch())
    ours = ppo.rloo_advantages(torch.tensor(REWARDS), G)
    torch.testing.assert_close(ours, out["advantages"], rtol=1e-5, atol=1e-6)


def test_rloo_advantages_match_trl_with_sequence_kl(make_trainer, monkeypatch):
    """RLOO puts beta * sum_t k1_t into the reward before the leave-one-out baseline. The per-token
    log-probs TRL used are captured from its own `_get_per_token_logps_and_entropies`."""
    beta = 0.1
    trainer = make_trainer(RLOOTrainer, beta=beta)
    assert trainer.ref_model is not None
    # a reference that differs from the policy, so that the KL term is not zero
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))

    calls = []
    original = trainer._get_per_token_logps_and_entropies

    def spy(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        calls.append((model, result[0]))
        return result

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(_prompt_batch())

    (old,) = [lp for m, lp in calls if m is trainer.model]
    (ref,) = [lp for m, lp in calls if m is trainer.ref_model]
    mask = out["completion_mask"]
    torch.testing.assert_close(ppo.masked_sum(old, mask, dim=1), out["old_logps"])
    kl = ppo.masked_sum(ppo.kl_estimate(old, ref, "k1"), mask, dim=1)
    assert (beta * kl).abs().max() > 1e-2  # the KL term really moves the advantages
    ours = ppo.rloo_advantages(torch.tensor(REWARDS) - beta * kl, G)
    torch.testing.assert_close(ours, out["advantages"], rtol=1e-5, atol=1e-5)
    # and without the KL they would differ
    assert not torch.allclose(ppo.rloo_advantages(torch.tensor(REWARDS), G), out["advantages"])


# ----------------------------------------------------------------------------------------------
# losses: TRL's _compute_loss on a hand-built batch
# ----------------------------------------------------------------------------------------------

PROMPT_LENS = [4, 3, 2, 4, 1, 3]
COMPLETION_LENS = [5, 3, 1, 5, 4, 2]


def _loss_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded completions of uneven lengths (ids avoid specials)."""
    gen = torch.Generator().manual_seed(0)
    b, p_len, t_len = len(PROMPT_LENS), max(PROMPT_LENS), max(COMPLETION_LENS)
    pad = tokenizer.pad_token_id
    prompt_ids = torch.randint(4, len(tokenizer), (b, p_len), generator=gen)
    completion_ids = torch.randint(4, len(tokenizer), (b, t_len), generator=gen)
    prompt_mask = torch.zeros(b, p_len, dtype=torch.long)
    completion_mask = torch.zeros(b, t_len, dtype=torch.long)
    for i, (pl, cl) in enumerate(zip(PROMPT_LENS, COMPLETION_LENS, strict=True)):
        prompt_mask[i, p_len - pl :] = 1
        completion_mask[i, :cl] = 1
    return {
        "prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, pad),
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids.masked_fill(completion_mask == 0, pad),
        "completion_mask": completion_mask,
    }


def _tether_logprobs(model, batch) -> torch.Tensor:
    """Log-probs of the completion tokens from a plain forward (logits, not TRL's fused head)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    t_len = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -t_len - 1 : -1]
    return ppo.logprobs_from_logits(logits.float(), batch["completion_ids"])


@torch.no_grad()
def _trl_logprobs(trainer, batch) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    t_len = batch["completion_ids"].shape[1]
    return trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, t_len)[0]


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


# (TRL loss_type, gradient_accumulation_steps) -> tether aggregation; under accumulation the
# micro-batch is half of a mini-batch whose other half has the same number of sequences and
# OTHER_TOKENS valid tokens, and tether gets the mini-batch's normalisers.
OTHER_TOKENS = 9
GRPO_LOSSES = [
    ("grpo", 1, "seq-mean-token-mean"),
    ("bnpo", 1, "token-mean"),
    ("dr_grpo", 1, "seq-mean-token-sum-norm"),
    ("dapo", 1, "token-mean"),
    ("grpo", 2, "seq-mean-token-mean"),
    ("dr_grpo", 2, "seq-mean-token-sum-norm"),
    ("dapo", 2, "token-mean"),
]


# (beta, use_bias_correction_kl). TRL 1.16 defaults the latter to True: its k3 term is then
# multiplied by the (unclipped, differentiable) ratio pi / pi_old; with False it is plain k3.
# Every aggregation without accumulation gets all three; under accumulation, no KL and TRL's
# default (so the test count and runtime stay small).
KL_CASES = [(0.0, True), (0.04, False), (0.04, True)]
GRPO_CASES = [
    (*loss, *kl)
    for loss in GRPO_LOSSES
    for kl in (KL_CASES if loss[1] == 1 else [KL_CASES[0], KL_CASES[2]])
]


@pytest.mark.parametrize("loss_type, accumulation, mode, beta, bias_correction", GRPO_CASES)
def test_grpo_loss_matches_trl(
    make_trainer, tokenizer, loss_type, accumulation, mode, beta, bias_correction
):
    trainer = make_trainer(
        GRPOTrainer,
        loss_type=loss_type,
        beta=beta,
        use_bias_correction_kl=bias_correction,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
    )
    model = trainer.model
    batch = _loss_batch(tokenizer)
    mask = batch["completion_mask"]
    b = mask.shape[0]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        current = _tether_logprobs(model, batch)
    # old log-probs off by up to +-0.5 (ratio 0.61..1.65: clipped on both sides of 1 +- 0.2), a
    # reference off by N(0, 0.5); finite garbage at padding, which both must ignore
    old = torch.where(mask.bool(), current + torch.rand(current.shape, generator=gen) - 0.5, 5.0)
    ref = torch.where(mask.bool(), current + 0.5 * torch.randn(current.shape, generator=gen), -5.0)
    advantages = torch.randn(b, generator=gen)
    n_tokens = mask.sum() + (OTHER_TOKENS if accumulation == 2 else 0)
    inputs = {
        **batch,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": n_tokens,
    }
    if beta:
        inputs["ref_per_token_logps"] = ref

    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = _grads(model)

    logprobs = _tether_logprobs(model, batch)
    # the same log-probs as TRL's fused LM head gives (0 at padding there)
    torch.testing.assert_close(
        torch.where(mask.bool(), logprobs.detach(), 0.0),
        _trl_logprobs(trainer, batch),
        rtol=0,
        atol=1e-5,
    )
    per_token, clipped, ratio = losses.policy_loss(
        logprobs, old, advantages[:, None].expand_as(logprobs), mask, CLIP
    )
    assert clipped.any() and (mask.bool() & ~clipped).any()
    if beta:
        # tether's kl_estimate is TRL's per_token_kl; importance_weighted_k3 its bias correction
        if bias_correction:
            kl = ppo.importance_weighted_k3(logprobs, old, ref)
        else:
            kl = ppo.kl_estimate(logprobs, ref, "k3")
        per_token = per_token + beta * kl
    ours = losses.aggregate_loss(
        per_token,
        mask,
        mode,
        n_tokens=n_tokens,
        n_sequences=accumulation * b,
        max_len=MAX_COMPLETION,
    )
    ours.backward()

    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
    _assert_same_grads(_grads(model), their_grads)


# The 2026 losses through tether's own `rl_loss` (what the update calls) against TRL's
# `_compute_loss`: (id, TRL config, rl_loss options, aggregation, beta). The clip ranges are set
# so that, on the batch below, the new bound matters (the negative controls check it does).
NEW_LOSS_CASES = [
    # DAPO's clip-higher: epsilon 0.2 below, epsilon_high 0.28 above
    (
        "clip-higher",
        dict(loss_type="dapo", epsilon_high=0.28),
        dict(policy_loss_kind="clip", cliprange=CLIP, cliprange_high=0.28),
        "token-mean",
        0.0,
    ),
    # GSPO: one geometric-mean ratio per completion; narrow clips, as the paper's 3e-4 / 4e-4
    # would be on ratios this far from 1; averaged over completions (TRL grpo) and over tokens
    (
        "gspo",
        dict(
            loss_type="grpo", importance_sampling_level="sequence", epsilon=0.04, epsilon_high=0.06
        ),
        dict(policy_loss_kind="gspo", cliprange=0.04, cliprange_high=0.06),
        "seq-mean-token-mean",
        0.0,
    ),
    (
        "gspo-token-mean",
        dict(
            loss_type="dapo", importance_sampling_level="sequence", epsilon=0.04, epsilon_high=0.06
        ),
        dict(policy_loss_kind="gspo", cliprange=0.04, cliprange_high=0.06),
        "token-mean",
        0.0,
    ),
    # CISPO: TRL's epsilon_high is the weight's cap itself, tether's cap is 1 + cliprange_high
    (
        "cispo",
        dict(loss_type="cispo", epsilon_high=1.3),
        dict(policy_loss_kind="cispo", cliprange=CLIP, cliprange_high=0.3),
        "token-mean",
        0.0,
    ),
    # SAPO with temperatures of its own, so that which sign gets which one shows
    (
        "sapo",
        dict(loss_type="sapo", sapo_temperature_pos=1.5, sapo_temperature_neg=3.0),
        dict(policy_loss_kind="sapo", cliprange=CLIP, sapo_temperatures=(1.5, 3.0)),
        "seq-mean-token-mean",
        0.0,
    ),
]
# the importance-weighted k3 (TRL's default use_bias_correction_kl) beside the new losses: the
# same cases with beta 0.04
NEW_LOSS_CASES += [
    (f"{case}+kl", trl, ours, mode, 0.04)
    for case, trl, ours, mode, _ in NEW_LOSS_CASES
    if case in ("clip-higher", "cispo", "sapo")
]
# what each case's loss is without its new piece: it must differ from TRL's by far more than the
# tolerance, or the case would not test that piece
NEGATIVE_CONTROLS = {
    "clip-higher": dict(cliprange_high=None),
    "gspo": dict(policy_loss_kind="clip"),
    "gspo-token-mean": dict(policy_loss_kind="clip"),
    "cispo": dict(cliprange_high=1.3),
    "sapo": dict(sapo_temperatures=(3.0, 1.5)),
}


@pytest.mark.parametrize(
    "trl_config, options, mode, beta",
    [case[1:] for case in NEW_LOSS_CASES],
    ids=[case[0] for case in NEW_LOSS_CASES],
)
def test_new_losses_match_trl(make_trainer, tokenizer, trl_config, options, mode, beta, request):
    trainer = make_trainer(GRPOTrainer, beta=beta, use_bias_correction_kl=True, **trl_config)
    model = trainer.model
    batch = _loss_batch(tokenizer)
    mask = batch["completion_mask"]
    b = mask.shape[0]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        current = _tether_logprobs(model, batch)
    # as in test_grpo_loss_matches_trl: ratios 0.61..1.65, a reference off by N(0, 0.5), finite
    # garbage at padding
    old = torch.where(mask.bool(), current + torch.rand(current.shape, generator=gen) - 0.5, 5.0)
    ref = torch.where(mask.bool(), current + 0.5 * torch.randn(current.shape, generator=gen), -5.0)
    advantages = torch.randn(b, generator=gen)
    inputs = {
        **batch,
        "advantages": advantages,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref

    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = _grads(model)

    def ours(logprobs, **changes):
        kl = ppo.importance_weighted_k3(logprobs, old, ref) if beta else None
        loss, stats = losses.rl_loss(
            logprobs,
            old,
            advantages[:, None].expand_as(logprobs),
            mask,
            aggregation=mode,
            n_tokens=mask.sum(),
            n_sequences=b,
            max_len=MAX_COMPLETION,
            kl=kl,
            kl_coef=beta,
            **{**options, **changes},
        )
        return loss, stats

    loss, stats = ours(_tether_logprobs(model, batch))
    loss.backward()
    torch.testing.assert_close(loss.detach(), theirs.detach(), rtol=0, atol=1e-6)
    _assert_same_grads(_grads(model), their_grads)

    case = request.node.callspec.id
    if options["policy_loss_kind"] != "sapo":  # sapo clips nothing
        assert 0 < stats["clipfrac"] < 1, case  # some ratios clipped (capped), some not
    if case in NEGATIVE_CONTROLS:
        with torch.no_grad():
            control, _ = ours(_tether_logprobs(model, batch), **NEGATIVE_CONTROLS[case])
        assert abs(control.item() - theirs.item()) > 1e-3, case


def test_soft_overlong_punishment_matches_trl():
    """DAPO eq. 13 against TRL's reward function of it, at every length around the buffer."""
    from trl.rewards import get_soft_overlong_punishment

    max_len, buffer = 20, 6
    lengths = list(range(0, 26))
    theirs = get_soft_overlong_punishment(max_len, buffer)([[1] * n for n in lengths])
    ours = ppo.overlong_penalty(torch.tensor(lengths), max_len, buffer)
    torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float32), rtol=0, atol=1e-6)
    assert ours[14].item() == 0.0 and ours[17].item() == pytest.approx(-0.5)  # 14 = 20 - 6


def test_rloo_loss_matches_trl(make_trainer, tokenizer):
    trainer = make_trainer(RLOOTrainer, beta=0.0)
    model = trainer.model
    batch = _loss_batch(tokenizer)
    mask = batch["completion_mask"]
    with torch.no_grad():
        current = _tether_logprobs(model, batch)
    # per-sequence log ratios log(pi / pi_old) = -offset, spread over the valid tokens, with
    # advantages of both signs, so that each of the four clip cases occurs:
    # (A > 0, r > 1.2) clipped, (A < 0, r < 0.8) clipped, (A > 0, r < 0.8), (A < 0, r > 1.2) not
    offset = torch.tensor([-0.5, 0.5, 0.05, 0.5, -0.5, -0.1])
    advantages = torch.tensor([1.0, -2.0, 0.7, 1.5, -0.3, -1.0])
    per_token_offset = offset[:, None] / mask.sum(1, keepdim=True)
    old = torch.where(mask.bool(), current + per_token_offset, 5.0)
    inputs = {**batch, "advantages": advantages, "old_logps": ppo.masked_sum(old, mask, dim=1)}

    model.zero_grad(set_to_none=True)
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = _grads(model)

    per_seq, clipped, ratio = losses.sequence_policy_loss(
        _tether_logprobs(model, batch), old, advantages, mask, CLIP
    )
    torch.testing.assert_close(ratio.detach(), offset.neg().exp(), rtol=1e-5, atol=1e-5)
    assert clipped.tolist() == [True, True, False, False, False, False]
    ours = per_seq.mean()
    ours.backward()

    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
    _assert_same_grads(_grads(model), their_grads)


# ----------------------------------------------------------------------------------------------
# full_kl
# ----------------------------------------------------------------------------------------------


def _kl_logits():
    gen = torch.Generator().manual_seed(3)
    logits = (2.0 * torch.randn(3, 5, 11, generator=gen)).requires_grad_()
    ref = 2.0 * torch.randn(3, 5, 11, generator=gen)
    return logits, ref


def test_full_kl_equals_torch_kl_div():
    logits, ref = _kl_logits()
    # F.kl_div(input=log q, target=log p, log_target=True) = p (log p - log q), summed over v
    expected = F.kl_div(
        F.log_softmax(ref, -1), F.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    got = ppo.full_kl(logits, ref, chunk_size=1000)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got > 1e-2).all()  # non-trivial distributions
    # equal distributions: 0 (with a constant shift of the logits too)
    torch.testing.assert_close(ppo.full_kl(ref, ref + 3.0), torch.zeros(3, 5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_full_kl_chunked_equals_unchunked_with_gradients(chunk_size):
    logits, ref = _kl_logits()
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    whole = ppo.full_kl(logits, ref, chunk_size=15)  # b * t positions in one chunk
    (grad_whole,) = torch.autograd.grad((whole * weights).sum(), logits)
    chunked = ppo.full_kl(logits, ref, chunk_size=chunk_size)
    (grad_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=1e-6)
    # and the gradient is the true one: that of torch's kl_div
    reference = F.kl_div(
        F.log_softmax(ref, -1), F.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# hand-computed
# ----------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 6.0])
    # group 1: mean 2.5, deviations [-1.5, -0.5, 0.5, 1.5], unbiased var (2.25+0.25+0.25+2.25)/3
    #   = 5/3, std 1.2909944; A = dev / (std + 1e-4) = dev / 1.2910944
    # group 2: mean 1.5, deviations [-1.5, -1.5, -1.5, 4.5], var (3*2.25 + 20.25)/3 = 9, std 3;
    #   A = dev / 3.0001
    s1, s2 = math.sqrt(5 / 3) + 1e-4, 3.0 + 1e-4
    expected = torch.tensor(
        [-1.5 / s1, -0.5 / s1, 0.5 / s1, 1.5 / s1, -1.5 / s2, -1.5 / s2, -1.5 / s2, 4.5 / s2]
    )
    torch.testing.assert_close(ppo.group_advantages(scores, 4), expected, rtol=0, atol=1e-6)
    assert ppo.group_advantages(scores, 4)[0].item() == pytest.approx(-1.161805, abs=1e-6)
    # scale=False keeps the deviations only (Dr. GRPO)
    unscaled = torch.tensor([-1.5, -0.5, 0.5, 1.5, -1.5, -1.5, -1.5, 4.5])
    torch.testing.assert_close(
        ppo.group_advantages(scores, 4, scale=False), unscaled, rtol=0, atol=1e-6
    )
    # G = 2 groups of the same scores: [1, 2] -> mean 1.5, std sqrt(0.5) = 0.7071068
    pairs = ppo.group_advantages(scores, 2)
    assert pairs[0].item() == pytest.approx(-0.5 / (math.sqrt(0.5) + 1e-4), abs=1e-6)
    # a constant group has advantage exactly 0 (0 / (0 + 1e-4))
    assert torch.equal(ppo.group_advantages(torch.full((4,), 0.7), 4), torch.zeros(4))


def test_rloo_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 0.0, 0.0])
    # group 1: baseline_i = (10 - r_i) / 3 = [3, 8/3, 7/3, 2] -> A = [-2, -2/3, 2/3, 2]
    #   (= G / (G - 1) * (r - mean) = 4/3 * [-1.5, -0.5, 0.5, 1.5])
    # group 2: sum 6, baselines [1/3, 5/3, 2, 2] -> A = [14/3, -2/3, -2, -2]
    expected = torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0, 14 / 3, -2 / 3, -2.0, -2.0])
    torch.testing.assert_close(ppo.rloo_advantages(scores, 4), expected, rtol=0, atol=1e-6)
    # G = 2: each one's baseline is its sibling: [1 - 2, 2 - 1, ...]
    expected2 = torch.tensor([-1.0, 1.0, -1.0, 1.0, 4.0, -4.0, 0.0, 0.0])
    torch.testing.assert_close(ppo.rloo_advantages(scores, 2), expected2, rtol=0, atol=1e-6)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # gamma 0.5. row 0: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5
    # row 1 (the 9 is padding, dropped): G1 = 5, G0 = 3 + 0.5 * 5 = 5.5, G2 = 0
    expected = torch.tensor([[1.5, 1.0, 2.0], [5.5, 5.0, 0.0]])
    got = ppo.discounted_returns(rewards, mask, 0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # gamma 1: plain reward-to-go [3, 2, 2], [8, 5, 0]
    torch.testing.assert_close(
        ppo.discounted_returns(rewards, mask, 1.0),
        torch.tensor([[3.0, 2.0, 2.0], [8.0, 5.0, 0.0]]),
        rtol=0,
        atol=1e-6,
    )


def test_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # returns (gamma 0.5, above) over valid tokens: [1.5, 1, 2, 5.5, 5]; mean 15 / 5 = 3;
    # deviations [-1.5, -2, -1, 2.5, 2], squares sum 17.5, unbiased var 17.5 / 4 = 4.375;
    # A = dev / sqrt(4.375 + 1e-8) = dev / 2.0916501; padding 0
    std = math.sqrt(4.375)
    expected = torch.tensor([[-1.5 / std, -2.0 / std, -1.0 / std], [2.5 / std, 2.0 / std, 0.0]])
    got = ppo.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[0, 0].item() == pytest.approx(-0.717137, abs=1e-6)


def test_aggregate_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5 (padding, even NaN, ignored)
    assert losses.aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.5, abs=1e-6)
    # seq-mean-token-mean: ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2 = 3
    got = losses.aggregate_loss(loss, mask, "seq-mean-token-mean")
    assert got.item() == pytest.approx(3.0, abs=1e-6)
    # seq-mean-token-sum-norm: 10 / (2 sequences * max_len 5) = 1; max_len defaults to t = 3: 10/6
    got = losses.aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=5)
    assert got.item() == pytest.approx(1.0, abs=1e-6)
    got = losses.aggregate_loss(loss, mask, "seq-mean-token-sum-norm")
    assert got.item() == pytest.approx(10 / 6, abs=1e-6)
    with pytest.raises(ValueError, match="bogus"):
        losses.aggregate_loss(loss, mask, "bogus")


@pytest.mark.parametrize(
    "mode, full_value",
    [
        # tokens 1..4 | 5, 6 | 7 | 8, 9, 10 -> 10 valid, sum 55 -> 5.5
        ("token-mean", 5.5),
        # sequence means 2.5, 5.5, 7, 9 -> 24 / 4 = 6
        ("seq-mean-token-mean", 6.0),
        # 55 / (4 sequences * max_len 6) = 2.2916667
        ("seq-mean-token-sum-norm", 55 / 24),
    ],
)
def test_aggregate_loss_micro_batches_sum_to_full_batch(mode, full_value):
    loss = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0],
            [5.0, 6.0, -50.0, -50.0],
            [7.0, -50.0, -50.0, -50.0],
            [8.0, 9.0, 10.0, -50.0],
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    full = losses.aggregate_loss(loss, mask, mode, max_len=6)
    assert full.item() == pytest.approx(full_value, abs=1e-6)
    # uneven halves (6 and 4 tokens), each with the full batch's normalisers
    halves = [
        losses.aggregate_loss(
            loss[rows], mask[rows], mode, n_tokens=mask.sum(), n_sequences=4, max_len=6
        )
        for rows in (slice(0, 2), slice(2, 4))
    ]
    assert (halves[0] + halves[1]).item() == pytest.approx(full_value, abs=1e-6)
    if mode == "token-mean":
        # with their own token counts the halves would not add up: 21/6 + 34/4 = 12 != 5.5 * 2
        own = [losses.aggregate_loss(loss[r], mask[r], mode) for r in (slice(0, 2), slice(2, 4))]
        assert (own[0] + own[1]).item() / 2 == pytest.approx(6.0, abs=1e-6)


def test_sequence_policy_loss_by_hand():
    # the padding position (index 2 of rows 0-1) carries garbage that must not enter the ratio
    logprobs = torch.tensor(
        [[-1.0, -2.0, 40.0], [-1.0, -0.3, -7.0], [-0.5, -0.5, -0.5], [-0.5, -0.5, -0.5]]
    )
    old = torch.tensor(
        [[-1.5, -2.0, -40.0], [-1.0, -0.2, 3.0], [-0.25, -0.25, -0.5], [-0.25, -0.25, -0.5]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    advantages = torch.tensor([1.0, -2.0, -1.0, 1.0])
    loss, clipped, ratio = losses.sequence_policy_loss(logprobs, old, advantages, mask, 0.2)
    # log r = [0.5, -0.1, -0.5, -0.5]: r = [1.648721, 0.904837, 0.606531, 0.606531]
    # row 0: A = 1,  max(-1.648721, -1.2) = -1.2 (clipped)
    # row 1: A = -2, r inside [0.8, 1.2]: 2 * 0.904837 = 1.809675 (not clipped)
    # row 2: A = -1, max(0.606531, 0.8) = 0.8 (clipped)
    # row 3: A = 1,  max(-0.606531, -0.8) = -0.606531 (pessimistic: not clipped)
    torch.testing.assert_close(
        ratio, torch.tensor([1.648721, 0.904837, 0.606531, 0.606531]), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        loss, torch.tensor([-1.2, 1.809675, 0.8, -0.606531]), rtol=0, atol=1e-6
    )
    assert clipped.tolist() == [True, False, True, False]
    # the gradient flows through unclipped sequences only: d(-r A)/d logprob_t = -r A per token
    logprobs.requires_grad_()
    loss, _, _ = losses.sequence_policy_loss(logprobs, old, advantages, mask, 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    expected = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [1.809675, 1.809675, 0.0],
            [0.0, 0.0, 0.0],
            [-0.606531, -0.606531, -0.606531],
        ]
    )
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
