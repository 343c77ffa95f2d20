"""Every estimator through one loop: learning a toy reward through the CLI (tiny Llama and T5),
what a critic-free run builds and saves, the KL placements and the exact KL, the length guards,
the reward-scale warning, and the combinations that are refused. Math against TRL:
test_estimators_trl.py."""

import json
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import one_line_error, tiny_run_config

from tether import ppo
from tether.cli import main
from tether.experience import full_kl_pass, make_experience, train_scores_of
from tether.trainer import build_policy, sampling_params, train


def _argv(model, prompts, reward, out, *extra):
    return [
        "train",
        "--policy",
        str(model),
        "--reward",
        reward,
        "--prompts",
        f"jsonl:{prompts}",
        "--out",
        str(out),
        "--no-progress",
        "--save-every",
        "0",
        "--judge-every",
        "0",
        *extra,
    ]


# (estimator, extra options): rloo's advantages are raw score differences (no normalisation, as in
# the paper and TRL), so on a 0-1 toy reward it trains on normalised scores, as detox does
LEARNERS = [
    ("grpo", []),
    ("rloo", ["--score-norm"]),
    ("reinforce++", []),
]


@pytest.mark.parametrize("advantage,extra", LEARNERS, ids=[a for a, _ in LEARNERS])
def test_each_estimator_raises_a_toy_reward_through_the_cli(
    advantage, extra, tiny_model, prompts_file, vowel_reward, tmp_path
):
    """The fraction of vowels rises clearly above its starting level for every critic-free
    estimator, causal and seq2seq, through `tether train`."""
    out = tmp_path / "run"
    shape = ["--steps", "20", "--batch-size", "16", "--mini-batch-size", "8"]
    shape += ["--max-new-tokens", "12", "--lr", "5e-3", "--lora-r", "8"]
    argv = _argv(tiny_model, prompts_file, f"python:{vowel_reward}:vowels", out, *shape)
    assert main([*argv, "--advantage", advantage, *extra]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows]
    first, last = statistics.mean(rewards[:4]), statistics.mean(rewards[-6:])
    assert last > first + 0.08, f"{advantage}: first4 {first:.3f}, last6 {last:.3f}"
    assert all(r["advantage"] == advantage for r in rows)
    assert all(abs(r["kl_mean"]) < 100 for r in rows)


def test_critic_free_runs_build_train_and_save_no_value_head(
    tiny_llama, prompts_file, vowel_reward, tmp_path
):
    cfg = tiny_run_config(
        tiny_llama,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{vowel_reward}:vowels",
        advantage="grpo",
        steps=2,
        batch_size=8,
        mini_batch_size=4,
        save_every=1,
    )
    result = train(cfg)
    assert result.policy.value_head is None
    names = [n for n, p in result.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for d in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-0"):
        assert (d / "adapter_model.safetensors").is_file()
        assert not (d / "value_head.safetensors").exists()
    row = result.metrics[-1]
    assert row["advantage"] == "grpo" and "kl_loss" in row
    assert not {"value_loss", "vf_clipfrac", "explained_variance"} & row.keys()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # the estimator's defaults are saved resolved: G = 4, the KL (k3) in the loss
    assert (saved["advantage"], saved["group_size"]) == ("grpo", 4)
    assert (saved["kl_penalty"], saved["kl_estimator"]) == ("loss", "k3")


def test_a_step_samples_group_size_completions_of_each_prompt(tiny_llama, prompts_file, tmp_path):
    log = tmp_path / "seen.jsonl"
    reward = tmp_path / "seen.py"
    reward.write_text(
        "import json\n"
        "def seen(prompts, completions):\n"
        f"    open({str(log)!r}, 'a').write(json.dumps(prompts) + '\\n')\n"
        "    return [0.0 for _ in completions]\n"
    )
    cfg = tiny_run_config(
        tiny_llama,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{reward}:seen",
        advantage="rloo",
        group_size=4,
        steps=2,
        batch_size=8,
        mini_batch_size=8,
    )
    train(cfg)
    steps = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(steps) == 2
    for prompts in steps:  # 8 completions = 2 prompts x 4, each group consecutive
        assert len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4
        assert prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_full_kl_runs_in_either_place_and_starts_at_zero(
    placement, tiny_model, prompts_file, vowel_reward, tmp_path
):
    cfg = tiny_run_config(
        tiny_model,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{vowel_reward}:vowels",
        advantage="grpo",
        kl_penalty=placement,
        kl_estimator="full",
        kl_chunk_size=5,
        steps=3,
        batch_size=8,
        mini_batch_size=4,
        lr=2e-2,
        kl_coef=0.5,
    )
    rows = train(cfg).metrics
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # step 0: policy = reference
    assert all(r["kl_mean"] >= 0 for r in rows)  # an exact KL is never negative
    assert rows[-1]["kl_mean"] > 1e-6  # and it moved
    assert ("kl_loss" in rows[-1]) == (placement == "loss")


def test_full_kl_pass_equals_kl_div_of_the_two_distributions(tiny_model, tmp_path):
    """The rollout's exact KL(policy || reference) per token, from the chunked two-pass
    function, equals torch's kl_div over the whole vocabulary of the same two forwards."""
    cfg = tiny_run_config(
        tiny_model,
        "unused",
        tmp_path / "run",
        reward="profanity",
        kl_estimator="full",
        forward_batch_size=3,
        kl_chunk_size=7,
    )
    policy = build_policy(cfg)
    with torch.no_grad():  # move the policy off the reference
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    rollout, _, _ = policy.generate(
        ["hello there", "the cat", "good", "see you"], sampling_params(cfg.sampling)
    )
    ref_lp, kl = full_kl_pass(policy, rollout, cfg)
    with torch.no_grad():
        logits = policy(rollout, with_values=False, with_logits=True).logits
        with policy.reference():
            ref = policy(rollout, with_values=False, with_logits=True)
    expected = F.kl_div(
        F.log_softmax(ref.logits, -1), F.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(kl[valid], expected[valid], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        ref_lp, policy.reference_logprobs(rollout, batch_size=cfg.rl.forward_batch_size)
    )
    assert kl[valid].min() >= 0 and kl[valid].max() > 1e-3


def test_length_guards_penalise_and_mask_truncated_completions(tiny_llama, tmp_path):
    cfg = tiny_run_config(
        tiny_llama,
        "unused",
        tmp_path / "run",
        reward="profanity",
        missing_eos_penalty=0.7,
        mask_truncated_completions=True,
        max_new_tokens=3,
        batch_size=8,
        mini_batch_size=4,
    )
    policy = build_policy(cfg)
    rollout, gen_out, _ = policy.generate(["hello"] * 8, sampling_params(cfg.sampling))
    # which rows ended with EOS, read off the tokens themselves
    last = rollout.response_ids.gather(1, ppo.last_valid_index(rollout.valid_mask)[:, None])
    ended = (last.squeeze(1) == policy.tokenizer.eos_token_id).tolist()
    assert rollout.finished.tolist() == ended
    finished = torch.tensor([True, False] * 4)
    rollout.finished = finished  # make both kinds certain, whatever the tiny model sampled

    class State:  # train_scores_of reads only the running moments, off here
        score_moments = None

    scores = train_scores_of([1.0] * 8, rollout, State(), cfg)
    assert scores == pytest.approx([1.0, 0.3] * 4)  # 1 - 0.7 for a completion without EOS
    exp = make_experience(
        rollout,
        gen_out,
        policy.reference_logprobs(rollout, batch_size=cfg.rl.forward_batch_size),
        scores,
        0.05,
        cfg,
    )
    assert exp.loss_mask[~finished].sum() == 0  # out of the loss
    torch.testing.assert_close(exp.loss_mask[finished], rollout.valid_mask[finished])


def test_small_reward_swamped_by_the_kl_penalty_warns_once(
    tiny_llama, prompts_file, vowel_reward, tmp_path, capsys
):
    """The issue's new user: a 0-0.05 reward, train's defaults (no score normalisation, KL in
    the reward at 0.05). The warning comes once and names the option; with --score-norm, none."""
    shape = ["--steps", "8", "--batch-size", "8", "--mini-batch-size", "4", "--lr", "5e-3"]
    argv = _argv(tiny_llama, prompts_file, f"python:{vowel_reward}:small", tmp_path / "a", *shape)
    assert main(argv) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "drowns the reward" in x]
    assert len(warnings) == 1 and "--score-norm" in warnings[0]
    argv = _argv(tiny_llama, prompts_file, f"python:{vowel_reward}:small", tmp_path / "b", *shape)
    assert main([*argv, "--score-norm"]) == 0
    assert "drowns the reward" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "options,message",
    [
        (["--advantage", "grpo", "--group-size", "1"], "group_size must be >= 2"),
        (["--advantage", "rloo", "--group-size", "3"], "not divisible by group_size 3"),
        (["--kl-penalty", "loss", "--kl-estimator", "k1"], "zero expected gradient"),
        (["--advantage", "reinforce++", "--kl-penalty", "loss"], "in the token rewards"),
        (["--advantage", "rloo", "--kl-penalty", "loss"], "one action"),
        (["--advantage", "rloo", "--loss-aggregation", "token-mean"], "no tokens to aggregate"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_line(
    options, message, train_args, capsys
):
    err = one_line_error([*train_args, "--batch-size", "4", *options], capsys)
    assert message in err
