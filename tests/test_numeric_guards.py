"""Numeric guards of the PPO update: NaN/inf in the logits, loss or gradients and extreme
importance ratios skip the mini-batch and are counted; too many in a row stop the run with one
line naming the step, and the last checkpoint stays as it was."""

import math

import pytest
import torch
from conftest import tiny_run_config

from tether.errors import TetherError
from tether.experience import make_experience
from tether.rundir import RunDir, checkpoint_problem
from tether.state import SkipCounter, TooManySkips
from tether.trainer import build_policy, sampling_params, train
from tether.update import ppo_update


def _cfg(model, prompts, reward, out, **kw):
    shape = dict(steps=2, batch_size=8, mini_batch_size=2, ppo_epochs=1, lr=1e-3)
    shape["reward"] = f"python:{reward}:frac_a"
    return tiny_run_config(model, prompts, out, **{**shape, **kw})


@pytest.fixture
def setup(tiny_llama, prompts_file, reward_file, tmp_path):
    """A policy and one scored batch of 8 (4 mini-batches of 2, one epoch)."""
    cfg = _cfg(tiny_llama, prompts_file, reward_file, tmp_path / "run")
    torch.manual_seed(0)
    policy = build_policy(cfg)
    rollout, gen_out, _ = policy.generate(["hello", "the cat"] * 4, sampling_params(cfg.sampling))
    exp = make_experience(
        rollout,
        gen_out,
        policy.reference_logprobs(rollout, batch_size=cfg.rl.forward_batch_size),
        [1.0, 0.0] * 4,
        0.05,
        cfg,
    )
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return cfg, policy, exp, opt, sched


def _update(setup, skips=None):
    cfg, policy, exp, opt, sched = setup
    return ppo_update(policy, opt, sched, exp, cfg, torch.Generator().manual_seed(0), skips)


def test_nan_logits_skip_the_minibatch(setup, monkeypatch, capsys):
    """The policy forward returns NaN log-probs (as NaN logits give) on its 2nd call only."""
    _, policy, *_ = setup
    real, calls = type(policy).forward, []

    def forward(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:
            out.logprobs = out.logprobs * float("nan")
        return out

    monkeypatch.setattr(type(policy), "forward", forward)
    stats = _update(setup)
    assert stats["skipped_nonfinite"] == 1 and stats["skipped_ratio"] == 0
    assert stats["skipped_minibatches"] == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in policy.trainable_parameters())


def test_nan_gradient_skips_the_minibatch_and_leaves_weights_and_adam_finite(setup, capsys):
    """A finite loss whose gradient is NaN (a hook poisons one gradient, once)."""
    _, policy, _, opt, _ = setup
    param = next(p for n, p in policy.named_parameters() if "lora_B" in n)
    fired = []

    def poison(grad):
        if not fired:
            fired.append(1)
            return torch.full_like(grad, float("inf"))
        return grad

    handle = param.register_hook(poison)
    stats = _update(setup)
    handle.remove()
    assert stats["skipped_nonfinite"] == 1 and fired
    assert "non-finite gradient" in capsys.readouterr().err
    assert all(torch.isfinite(p).all() for p in policy.trainable_parameters())
    for state in opt.state.values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def test_extreme_importance_ratio_skips_the_minibatch(setup, capsys):
    """Rows 0 and 1 get old log-probs 5 nats lower: their mini-batch's mean ratio is about
    e^5 = 148 > 10 and it is skipped; the other mini-batches (ratio exactly 1) step."""
    cfg, policy, exp, *_ = setup
    exp.old_logprobs[:2] -= 5.0
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    stats = _update(setup)
    assert stats["skipped_ratio"] >= 1 and stats["skipped_nonfinite"] == 0
    assert stats["skipped_ratio"] <= 2  # rows 0 and 1 may share a mini-batch or not
    assert "importance ratio beyond 10" in capsys.readouterr().err
    assert any(
        not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters(), strict=True)
    )


def test_ratio_check_can_be_turned_off(setup):
    cfg, policy, exp, opt, sched = setup
    exp.old_logprobs[:2] -= 5.0
    cfg = cfg.replace(max_importance_ratio=None)
    stats = ppo_update(policy, opt, sched, exp, cfg, torch.Generator().manual_seed(0))
    assert stats["skipped_minibatches"] == 0


def test_skip_counter_counts_in_a_row_across_calls():
    skips = SkipCounter(limit=3)
    skips.skipped("a")
    skips.skipped("b")
    skips.stepped()  # an optimiser step in between resets the count
    skips.skipped("c")
    skips.skipped("d")
    with pytest.raises(TooManySkips, match="e"):
        skips.skipped("e")


def test_poisoned_weights_stop_the_run_and_keep_the_last_checkpoint(
    tiny_llama, prompts_file, reward_file, tmp_path
):
    """A LoRA weight turns NaN during step 2's scoring: every mini-batch from then on is
    skipped; after 3 in a row the run stops in one line naming the step and checkpoint step-1,
    which stays complete with finite weights, and no final/ pretends the run finished."""
    out = tmp_path / "run"
    cfg = _cfg(
        tiny_llama,
        prompts_file,
        reward_file,
        out,
        steps=6,
        batch_size=4,
        save_every=2,
        max_consecutive_skips=3,
    )
    policy = build_policy(cfg)
    calls = []

    class Poisoner:
        name = "poisoner"

        def score(self, prompts, completions):
            calls.append(1)
            if len(calls) == 3:  # step 2
                with torch.no_grad():
                    next(p for n, p in policy.named_parameters() if "lora_A" in n).fill_(math.nan)
            return [float(c.count("a")) for c in completions]

    with pytest.raises(TetherError) as err:
        train(cfg, reward=Poisoner(), policy=policy)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("step 3: 3 mini-batches in a row skipped"), msg
    assert str(out / "checkpoints" / "step-1") in msg
    run = RunDir(out)
    assert run.latest_checkpoint() == out / "checkpoints" / "step-1"
    assert checkpoint_problem(out / "checkpoints" / "step-1") is None
    assert not (out / "final").exists()
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[2]["skipped_nonfinite"] == 2 and rows[1]["skipped_nonfinite"] == 0
    assert all(math.isfinite(r["kl_coef"]) for r in rows)
    fresh = build_policy(cfg)
    fresh.load_trainable(out / "checkpoints" / "step-1")
    assert all(torch.isfinite(p).all() for p in fresh.trainable_parameters())
