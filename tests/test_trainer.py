"""End to end on tiny models: PPO learns a toy reward, the leash holds, invariances, resume."""

import json
import statistics

import pytest
import torch
from conftest import assert_close_nested, tiny_run_config

from tether.experience import make_experience, reference_pass
from tether.rewards.python import PythonReward
from tether.trainer import batch_indices, build_policy, sampling_params, train
from tether.update import micro_batch_size, ppo_update


def _cfg(model, prompts, reward_file, out, **kw):
    shape = dict(steps=40, batch_size=32, mini_batch_size=8, max_new_tokens=16, lr=5e-3, lora_r=8)
    reward = f"python:{reward_file}:vowels"
    return tiny_run_config(model, prompts, out, **{"reward": reward, **shape, **kw})


def test_ppo_raises_a_toy_reward(tiny_model, prompts_file, vowel_reward, tmp_path):
    """The fraction of vowels must rise clearly above its starting level, KL staying finite."""
    result = train(_cfg(tiny_model, prompts_file, vowel_reward, tmp_path / "run"))
    rewards = [m["reward_mean"] for m in result.metrics]
    first, last = statistics.mean(rewards[:5]), statistics.mean(rewards[-10:])
    assert last > first + 0.1, f"reward did not rise: first5 {first:.3f}, last10 {last:.3f}"
    kls = [m["kl_mean"] for m in result.metrics]
    assert all(map(lambda k: k == k and abs(k) < 100, kls))
    assert kls[0] == pytest.approx(0.0, abs=1e-4)  # step 0: the policy IS the reference


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_constant_reward_kl_penalty_alone_pulls_policy_back(
    tiny_llama, prompts_file, vowel_reward, tmp_path, kl_coef
):
    """Start the policy far from the reference (random LoRA B); with a constant reward the KL
    penalty is the only signal: with it KL must shrink, without it KL must stay where it was."""
    cfg = _cfg(
        tiny_llama,
        prompts_file,
        vowel_reward,
        tmp_path / "run",
        reward=f"python:{vowel_reward}:constant",
        steps=15,
        kl_coef=kl_coef,
    )
    torch.manual_seed(0)
    policy = build_policy(cfg)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    kls = [m["kl_mean"] for m in train(cfg, policy=policy).metrics]
    start, end = kls[0], statistics.mean(kls[-5:])
    assert start > 5.0, kls  # the perturbation really moved the policy away
    if kl_coef:
        assert end < 0.4 * start, kls
    else:
        assert end > 0.7 * start, kls


def test_adaptive_kl_coefficient_rises_when_kl_exceeds_target(
    tiny_llama, prompts_file, vowel_reward, tmp_path
):
    cfg = _cfg(
        tiny_llama,
        prompts_file,
        vowel_reward,
        tmp_path / "run",
        steps=12,
        target_kl=0.01,
        kl_horizon=100,
    )
    coefs = [m["kl_coef"] for m in train(cfg).metrics]
    assert coefs[0] == 0.05 and coefs[-1] > coefs[0]


def test_metrics_and_run_directory(tiny_t5, prompts_file, vowel_reward, tmp_path):
    out = tmp_path / "run"
    train(
        _cfg(
            tiny_t5,
            prompts_file,
            vowel_reward,
            out,
            steps=4,
            batch_size=8,
            mini_batch_size=4,
            save_every=2,
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    required = {
        "step",
        "reward_mean",
        "reward_std",
        "kl_mean",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "clipfrac",
        "approx_kl",
        "entropy",
        "response_len_mean",
        "step_seconds",
        "gen_seconds",
        "score_seconds",
        "forward_seconds",
        "advantages_seconds",
        "update_seconds",
        "guard_seconds",
    }
    assert required <= rows[0].keys()
    assert (out / "config.yaml").read_text().startswith("policy: ")
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "value_head.safetensors").is_file()
    assert (out / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    assert (out / "checkpoints" / "step-1" / "config.yaml").read_text() == (
        out / "config.yaml"
    ).read_text()
    assert not (
        out / "checkpoints" / "step-3"
    ).exists()  # the last step is final/, not a checkpoint
    assert not [p for p in out.rglob(".*tmp*")]


# every estimator's loss, and each aggregation: accumulation must not change the update
ESTIMATOR_LOSSES = [
    {},  # gae, token-mean, KL in the reward
    {"advantage": "grpo", "group_size": 2, "loss_aggregation": "seq-mean-token-mean"},
    {"advantage": "grpo", "group_size": 2, "loss_aggregation": "seq-mean-token-sum-norm"},
    {"advantage": "grpo", "group_size": 2, "kl_estimator": "full"},  # full KL in the loss
    {"advantage": "rloo", "group_size": 2},  # one ratio per completion
    {"advantage": "reinforce++"},
]


@pytest.mark.parametrize(
    "estimator", ESTIMATOR_LOSSES, ids=lambda kw: "-".join(map(str, kw.values())) or "gae"
)
def test_gradient_accumulation_equals_full_minibatch(
    tiny_llama, prompts_file, vowel_reward, tmp_path, estimator
):
    """4 micro-batches of 2 (asked for, or the CPU default) give the update of one mini-batch
    of 8."""
    reward = PythonReward.from_spec(f"{vowel_reward}:vowels")
    results = []
    for accum in (1, 4, None):
        cfg = _cfg(
            tiny_llama,
            prompts_file,
            vowel_reward,
            tmp_path / f"r{accum}",
            batch_size=8,
            mini_batch_size=8,
            gradient_accumulation_steps=accum,
            ppo_epochs=1,
            **estimator,
        )
        torch.manual_seed(0)
        policy = build_policy(cfg)
        torch.manual_seed(0)
        rollout, gen_out, _ = policy.generate(
            ["hello there", "the cat sat", "good day", "see you"] * 2, sampling_params(cfg.sampling)
        )
        scores = reward.score(rollout.prompts, rollout.completions)
        ref_logprobs, kl = reference_pass(policy, rollout, cfg)
        exp = make_experience(rollout, gen_out, ref_logprobs, scores, 0.05, cfg, kl)
        opt = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        stats = ppo_update(policy, opt, sched, exp, cfg, torch.Generator().manual_seed(0))
        results.append(([p.detach().clone() for p in policy.trainable_parameters()], stats))
    (p1, s1), *accumulated = results
    for p4, s4 in accumulated:
        for a, b in zip(p1, p4, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert s1["policy_loss"] == pytest.approx(s4["policy_loss"], abs=1e-5)


def test_micro_batch_size_default_is_two_on_cpu_and_whole_elsewhere(tiny_llama, tmp_path):
    def micro(mini, accum, device):
        cfg = _cfg(tiny_llama, "unused", "unused", tmp_path, batch_size=8, mini_batch_size=mini)
        cfg.rl.gradient_accumulation_steps = accum
        return micro_batch_size(cfg, torch.device(device))

    assert [micro(4, None, "cpu"), micro(1, None, "cpu"), micro(4, None, "cuda")] == [2, 1, 4]
    assert [micro(8, 2, "cpu"), micro(8, 1, "cpu"), micro(8, 4, "cuda")] == [4, 8, 2]


def test_nan_loss_minibatch_is_skipped(tiny_llama, prompts_file, tmp_path, capsys):
    path = tmp_path / "nan_reward.py"
    path.write_text("def f(p, c):\n    return [1.0 for _ in c]\n")
    cfg = _cfg(
        tiny_llama,
        prompts_file,
        path,
        tmp_path / "run",
        reward=f"python:{path}:f",
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=1,
    )
    policy = build_policy(cfg)
    rollout, gen_out, _ = policy.generate(["hello"] * 8, sampling_params(cfg.sampling))
    exp = make_experience(
        rollout,
        gen_out,
        policy.reference_logprobs(rollout, batch_size=cfg.rl.forward_batch_size),
        [1.0] * 8,
        0.05,
        cfg,
    )
    exp.advantages[0, 0] = float("nan")  # poisons exactly one mini-batch (the one holding row 0)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    stats = ppo_update(policy, opt, sched, exp, cfg, torch.Generator().manual_seed(0))
    assert stats["skipped_minibatches"] == 1
    assert "non-finite loss" in capsys.readouterr().err
    after = policy.trainable_parameters()
    assert all(torch.isfinite(p).all() for p in after)
    assert any(
        not torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )  # the other one stepped


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_resume_matches_uninterrupted_run(
    tiny_llama, prompts_file, vowel_reward, tmp_path, advantage
):
    kw = dict(steps=6, batch_size=8, mini_batch_size=4, save_every=3, judge_every=2)
    kw["advantage"] = advantage  # grpo: no value head to save, the KL in the loss
    full = train(_cfg(tiny_llama, prompts_file, vowel_reward, tmp_path / "full", **kw))
    # the "crashed" run stopped after step 4: checkpoint step-2 exists, metrics has rows 0..4
    part_dir = tmp_path / "part"
    train(_cfg(tiny_llama, prompts_file, vowel_reward, part_dir, **{**kw, "steps": 5}))
    resumed = train(_cfg(tiny_llama, prompts_file, vowel_reward, part_dir, resume=True, **kw))
    rows_full = [{k: v for k, v in r.items() if "seconds" not in k} for r in full.metrics]
    rows_res = [json.loads(line) for line in (part_dir / "metrics.jsonl").read_text().splitlines()]
    rows_res = [{k: v for k, v in r.items() if "seconds" not in k} for r in rows_res]
    assert [r["step"] for r in rows_res] == list(range(6))
    for a, b in zip(rows_full, rows_res, strict=True):
        assert_close_nested(a, b, rel=1e-4, abs=1e-5)
    for a, b in zip(
        full.policy.trainable_parameters(), resumed.policy.trainable_parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batch_indices_cover_every_prompt_once_per_pass():
    seen = [i for step in range(4) for i in batch_indices(10, 5, seed=3, step=step)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(10, 5, 3, 1) == batch_indices(10, 5, 3, 1)
    assert len(batch_indices(3, 8, 0, 0)) == 8  # a batch bigger than the pool wraps around


def test_early_stop_on_approx_kl(tiny_llama, prompts_file, vowel_reward, tmp_path):
    """A tiny approx-KL limit ends the epoch loop after the first mini-batch that moves."""
    cfg = _cfg(
        tiny_llama,
        prompts_file,
        vowel_reward,
        tmp_path / "run",
        steps=2,
        batch_size=8,
        mini_batch_size=2,
        ppo_epochs=4,
        early_stop_kl=1e-9,
        lr=1e-2,
    )
    rows = train(cfg).metrics
    # step 0's first mini-batch has ratio 1 (approx-KL 0); the second one already moved
    assert all(r["ppo_epochs_run"] == 1 for r in rows), rows
    full = train(
        _cfg(
            tiny_llama,
            prompts_file,
            vowel_reward,
            tmp_path / "run2",
            steps=1,
            batch_size=8,
            mini_batch_size=2,
            ppo_epochs=4,
            lr=1e-2,
        )
    ).metrics
    assert full[0]["ppo_epochs_run"] == 4


def test_running_moments_match_numpy_over_batches():
    import numpy as np

    from tether.state import RunningMoments

    rng = np.random.default_rng(0)
    batches = [list(rng.normal(3.0, 2.0, size=n)) for n in (5, 16, 1, 9)]
    rm = RunningMoments()
    for batch in batches:
        out = rm.normalize(batch)
    seen = np.concatenate(batches)
    assert rm.count == len(seen)
    assert rm.mean == pytest.approx(seen.mean())
    assert rm.m2 / (rm.count - 1) == pytest.approx(seen.var(ddof=1))
    expected = (np.array(batches[-1]) - seen.mean()) / seen.std(ddof=1)
    assert out == pytest.approx(list(expected))
