"""Rollouts sampled in cheaper numerics (--rollout-dtype bfloat16 / int8): the mismatch with
training's log-probs is measured every step and corrected by truncated importance sampling."""

import functools
import math

import pytest
import torch
from conftest import tiny_run_config

from tether import fastpath, ppo
from tether.errors import TetherError
from tether.trainer import build_policy, train

TRAIN_P = [[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]
ROLLOUT_P = [[0.25, 0.4, 0.3], [0.3, 0.1, 0.5]]
VALID = [[1, 1, 1], [1, 1, 0]]  # the last token of row 1 is padding


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(TRAIN_P).log(), torch.tensor(ROLLOUT_P).log(), torch.tensor(VALID)


def test_truncated_is_weights_are_the_truncated_ratios_by_hand():
    """ratios pi_train / pi_rollout = [[2, 0.5, 3], [1, 6, pad]]: cap 2.5 cuts 3 and 6; per
    completion the products are 3 and 6 (the padding's ratio 0.2 left out)."""
    train_lp, rollout_lp, valid = _toy()
    weights = ppo.truncated_is_weights(train_lp, rollout_lp, valid, cap=2.5)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 2.5], [1.0, 2.5, 0.0]]))
    per_seq = ppo.truncated_is_weights(train_lp, rollout_lp, valid, 10.0, per_sequence=True)
    torch.testing.assert_close(per_seq, torch.tensor([[3.0], [6.0]]))
    capped = ppo.truncated_is_weights(train_lp, rollout_lp, valid, 2.5, per_sequence=True)
    torch.testing.assert_close(capped, torch.tensor([[2.5], [2.5]]))
    assert not weights.requires_grad


def test_rollout_mismatch_is_the_mean_k3_the_largest_ratio_and_the_share_cut():
    train_lp, rollout_lp, valid = _toy()
    ratios = [2.0, 0.5, 3.0, 1.0, 6.0]
    k3 = sum(r - 1 - math.log(r) for r in ratios) / len(ratios)
    m = ppo.rollout_mismatch(train_lp, rollout_lp, valid, cap=2.5)
    assert m["rollout_kl"].item() == pytest.approx(k3, rel=1e-5)
    assert m["rollout_max_ratio"].item() == pytest.approx(6.0, rel=1e-5)
    assert m["tis_clipped_frac"].item() == pytest.approx(2 / 5)  # 3 and 6 are above 2.5


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", None])
def test_rl_loss_weighs_each_clipped_surrogate_by_its_is_weight(aggregation):
    """With weights w the policy loss is agg(w_t L^CLIP_t) (per completion w_i L^CLIP_i for the
    sequence-level ratio); weights of 1 change nothing."""
    torch.manual_seed(0)
    lp, old = torch.randn(3, 5) * 0.1, torch.randn(3, 5) * 0.1
    adv = torch.randn(3, 5) if aggregation else torch.randn(3, 1).expand(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    norm = dict(n_tokens=mask.sum(), n_sequences=3, max_len=5)
    shape = (3, 5) if aggregation else (3, 1)
    w = torch.rand(shape) * 2

    def loss(weights):
        return ppo.rl_loss(lp, old, adv, mask, 0.2, aggregation, **norm, is_weights=weights)[0]

    if aggregation is None:
        per_seq, _, _ = ppo.sequence_policy_loss(lp, old, adv[:, 0], mask, 0.2)
        expected = (w[:, 0] * per_seq).sum() / 3
    else:
        pg, _, _ = ppo.policy_loss(lp, old, adv, mask, 0.2)
        expected = ppo.aggregate_loss(w * pg, mask, aggregation, **norm)
    torch.testing.assert_close(loss(w), expected)
    torch.testing.assert_close(loss(torch.ones(shape)), loss(None))
    assert (loss(w) - loss(None)).abs() > 1e-4  # the weights matter


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_rollout_layers_are_close_to_the_fp32_layers_and_put_back(tiny_llama, dtype):
    """Inside `installed()` every frozen layer runs in `dtype` (near, not equal, to fp32); after
    it, the fp32 forward (tether's oneDNN one) is back on each layer."""
    cfg = tiny_run_config(tiny_llama, tiny_llama, tiny_llama, reward="python:x.py:f")
    policy = build_policy(cfg)
    weights = fastpath.RolloutWeights(policy.model, dtype)
    layer = policy.model.get_base_model().model.layers[0].mlp.down_proj
    assert layer in weights.forwards
    before = layer.forward
    x = torch.randn(4, layer.in_features)
    exact = torch.nn.functional.linear(x, layer.weight)
    with weights.installed():
        cheap = layer(x)
    assert layer.forward == before
    err = (cheap - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.02, err
    with pytest.raises(TetherError, match="float16"):
        fastpath.RolloutWeights(policy.model, "float16")


def _run(model, prompts, reward, out, **kw):
    shape = dict(steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=1)
    return tiny_run_config(model, prompts, out, reward=f"python:{reward}:vowels", **shape, **kw)


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo", "reinforce++"])
def test_int8_rollouts_train_every_estimator_and_log_the_mismatch(
    tiny_llama, prompts_file, vowel_reward, tmp_path, advantage
):
    """Each step logs a positive mismatch (int8 weights are not fp32's) and finite losses; the
    old log-probs the update uses are training's, so the KL to the reference starts at ~0."""
    group = {"group_size": 2} if advantage in ("grpo", "rloo") else {}
    cfg = _run(
        tiny_llama,
        prompts_file,
        vowel_reward,
        tmp_path / "run",
        advantage=advantage,
        rollout_dtype="int8",
        **group,
    )
    rows = train(cfg).metrics
    assert len(rows) == 2
    for row in rows:
        assert 0 < row["rollout_kl"] < 1.0 and row["rollout_max_ratio"] > 1.0
        assert 0 <= row["tis_clipped_frac"] <= 1 and math.isfinite(row["policy_loss"])
    assert abs(rows[0]["kl_mean"]) < 1e-4  # training numerics: the policy is the reference


def test_the_mismatch_is_zero_when_the_rollout_layers_are_training_layers(
    tiny_llama, prompts_file, vowel_reward, tmp_path, monkeypatch
):
    """With the bfloat16 layers made plain fp32 ones (quantization a no-op), the logged mismatch
    is ~0 (float rounding of another kernel), every ratio ~1 and nothing is truncated; with real
    bf16 it is not, so the check can fail."""
    cfg = _run(tiny_llama, prompts_file, vowel_reward, tmp_path / "bf16", rollout_dtype="bfloat16")
    real = train(cfg).metrics[0]
    assert real["rollout_kl"] > 1e-7

    def fp32_layer(weight, bias):
        return functools.partial(torch.nn.functional.linear, weight=weight, bias=bias)

    monkeypatch.setitem(fastpath.ROLLOUT_LAYERS, "bfloat16", fp32_layer)
    cfg = _run(tiny_llama, prompts_file, vowel_reward, tmp_path / "noop", rollout_dtype="bfloat16")
    noop = train(cfg).metrics
    for row in noop:
        assert row["rollout_kl"] < 1e-9
        assert row["rollout_max_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert row["tis_clipped_frac"] == 0


def test_plain_path_refuses_a_rollout_dtype(tiny_llama, prompts_file, vowel_reward, tmp_path):
    cfg = _run(tiny_llama, prompts_file, vowel_reward, tmp_path / "r", rollout_dtype="int8")
    policy = build_policy(cfg)
    policy.fast_path = False
    with pytest.raises(TetherError, match="--rollout-dtype int8.*TETHER_FAST_PATH=0"):
        policy.generate(["hello"], fastpath.SamplingParams(max_new_tokens=2), "int8")
