"""Every estimator through one loop: learning a toy reward through the CLI (tiny Llama and T5),
what a critic-free run builds and saves, the KL placements and the exact KL, the length guards,
the reward-scale warning, and the combinations that are refused. Math against TRL:
test_estimators_trl.py."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import PROMPT_WORDS, one_line_error, tiny_run_config, undocumented

from tether import ppo
from tether.cli import main
from tether.config import CaiConfig, DetoxConfig, HackingDemoConfig
from tether.data import load_prompts
from tether.errors import TetherError
from tether.experience import full_kl_pass, make_experience, train_scores_of
from tether.rewards import load_reward
from tether.rollout import Rollout, step_seed
from tether.trainer import build_policy, rollout_and_score, sampling_params, train


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


# (id, estimator, extra options): rloo's advantages are raw score differences (no normalisation,
# as in the paper and TRL), so on a 0-1 toy reward it trains on normalised scores, as detox does.
# The policy losses of 2026 run on grpo's advantages; cispo's cap is ScaleRL's 5 (TRL's advice).
LEARNERS = [
    ("grpo", "grpo", []),
    ("rloo", "rloo", ["--score-norm"]),
    ("reinforce++", "reinforce++", []),
    ("clip-higher", "grpo", ["--cliprange-high", "0.28"]),
    ("gspo", "grpo", ["--policy-loss", "gspo"]),
    ("cispo", "grpo", ["--policy-loss", "cispo", "--cliprange-high", "4"]),
    ("sapo", "grpo", ["--policy-loss", "sapo"]),
]


@pytest.mark.parametrize("advantage,extra", [c[1:] for c in LEARNERS], ids=[c[0] for c in LEARNERS])
def test_each_estimator_raises_a_toy_reward_through_the_cli(
    advantage, extra, tiny_model, prompts_file, vowel_reward, tmp_path
):
    """The fraction of vowels rises clearly above its starting level for every critic-free
    estimator and policy loss, causal and seq2seq, through `tether train`."""
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
        (["--policy-loss", "gspo"], "--advantage gae learns a per-token critic"),
        (["--advantage", "reinforce++", "--policy-loss", "gspo"], "vary per token"),
        (["--advantage", "rloo", "--policy-loss", "cispo"], "rloo's loss is its own"),
        (["--advantage", "rloo", "--policy-loss", "sapo"], "--policy-loss sapo"),
        (["--cliprange-high", "0"], "cliprange_high must be > 0, got 0.0"),
        (["--sapo-temperature-neg", "-1"], "sapo temperatures must be > 0"),
        (["--kl-bias-correction"], "--kl-penalty reward --kl-estimator k1"),
        (
            ["--advantage", "grpo", "--kl-estimator", "k2", "--kl-bias-correction"],
            "--kl-penalty loss --kl-estimator k2",
        ),
        (["--dynamic-sampling"], "--advantage gae has none"),
        (["--advantage", "reinforce++", "--dynamic-sampling"], "--advantage reinforce++"),
        (["--max-extra-sampling-rounds", "-1"], "max_extra_sampling_rounds must be >= 0"),
        (["--overlong-buffer", "5"], "overlong_buffer must be in [1, max_new_tokens 4], got 5"),
        (["--overlong-buffer", "0"], "got 0"),
        (["--overlong-penalty", "-0.5"], "overlong_penalty must be >= 0"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_in_one_line(
    options, message, train_args, capsys
):
    err = one_line_error([*train_args, "--batch-size", "4", *options], capsys)
    assert message in err


# ----------------------------------------------------------------------------------------------
# DAPO's dynamic sampling and soft overlong punishment (TRL has no dynamic sampling: by hand)
# ----------------------------------------------------------------------------------------------

# the prompts whose reward is constant (their groups carry no advantage); the other two get a
# score that differs between any two different completions
CONSTANT_PROMPTS = PROMPT_WORDS[1:5] + PROMPT_WORDS[6:]


@pytest.fixture
def half_constant_reward(tmp_path):
    path = tmp_path / "half_constant.py"
    path.write_text(
        "import zlib\n"
        f"CONSTANT = {CONSTANT_PROMPTS!r}\n"
        "def score(prompts, completions):\n"
        "    return [0.0 if p in CONSTANT else 1.0 + zlib.crc32(c.encode()) % 997 / 997\n"
        "            for p, c in zip(prompts, completions)]\n"
    )
    return path


def _sample(cfg, step=0):
    policy = build_policy(cfg)
    reward = load_reward(cfg.task.reward, "cpu")
    records = load_prompts(cfg.task.prompts, "all", cfg.task.heldout_fraction)
    torch.manual_seed(step_seed(cfg.training.seed, step))
    sampled = rollout_and_score(policy, reward, records, sampling_params(cfg.sampling), cfg, step)
    return policy, reward, sampled


def test_dynamic_sampling_keeps_only_groups_that_differ(
    tiny_model, prompts_file, half_constant_reward, tmp_path
):
    """Six prompts in eight score 0 whatever is sampled. With --dynamic-sampling the step's
    batch (2 groups of 4) holds only the other prompts' groups, gathered over rounds; the
    dropped groups are counted; the rows of the batch stay together (each score is its
    completion's, and the log-probs from sampling, re-padded across rounds, equal a fresh
    forward pass over the joined batch). Without it (the negative control) the same step trains
    on a constant group."""
    cfg = tiny_run_config(
        tiny_model,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{half_constant_reward}:score",
        advantage="grpo",
        batch_size=8,
        mini_batch_size=4,
        dynamic_sampling=True,
        max_extra_sampling_rounds=8,
    )
    policy, reward, sampled = _sample(cfg)
    rollout = sampled.rollout
    assert len(rollout) == 8 and sampled.rounds >= 2  # round 0 alone did not fill the batch
    groups = [rollout.prompts[i : i + 4] for i in (0, 4)]
    assert all(g == [g[0]] * 4 and g[0] not in CONSTANT_PROMPTS for g in groups), groups
    # (with this seed the two come from different rounds, prompts of different lengths: the
    # prompt block was re-padded)
    assert rollout.prompt_mask.sum(1).unique().numel() == 2
    assert sampled.scores == reward.score(rollout.prompts, rollout.completions)
    # every constant group sampled (all its scores 0) was dropped, and nothing else
    all_groups = torch.tensor(sampled.all_scores).view(-1, 4)
    assert len(all_groups) == 2 * sampled.rounds
    assert sampled.dropped_groups == int((all_groups == 0).all(1).sum()) >= 1
    with torch.no_grad():
        fresh = policy(rollout, with_values=False).logprobs
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(
        sampled.rollout_out.logprobs[valid], fresh[valid], atol=1e-4, rtol=1e-4
    )
    assert (sampled.rollout_out.logprobs[~valid] == 0).all()

    _, _, plain = _sample(cfg.replace(dynamic_sampling=False))
    assert plain.rounds == 1 and plain.dropped_groups == 0
    assert any(p in CONSTANT_PROMPTS for p in plain.rollout.prompts)


def test_dynamic_sampling_gives_up_after_its_rounds_and_logs_the_drops(
    tiny_llama, prompts_file, vowel_reward, tmp_path
):
    """A constant reward: every group is dropped, the step samples 1 + 2 rounds, then trains on
    a batch filled with dropped groups (advantage 0: no policy loss); metrics.jsonl says how
    many were left out (3 rounds x 2 groups - 2 used) and how many rounds ran."""
    cfg = tiny_run_config(
        tiny_llama,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{vowel_reward}:constant",
        advantage="grpo",
        steps=2,
        batch_size=8,
        mini_batch_size=4,
        dynamic_sampling=True,
        max_extra_sampling_rounds=2,
    )
    rows = train(cfg).metrics
    for row in rows:
        assert (row["sampling_rounds"], row["dropped_groups"]) == (3, 4)
        assert row["policy_loss"] == 0.0 and row["reward_mean"] == 0.0
    saved = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped_groups"] for r in saved] == [4, 4]
    assert undocumented(tmp_path / "run") == []  # the new keys are in the docs' reference


def test_overlong_punishment_shapes_the_scores_by_hand(tiny_llama, tmp_path):
    """DAPO eq. 13 on the scores the update sees, beside --missing-eos-penalty: L_max 8,
    L_cache 4 (free up to 4 tokens), coefficient 0.5."""
    cfg = tiny_run_config(
        tiny_llama,
        "unused",
        tmp_path / "run",
        reward="profanity",
        max_new_tokens=8,
        overlong_buffer=4,
        overlong_penalty=0.5,
        missing_eos_penalty=0.7,
    )
    lengths = torch.tensor([3, 4, 5, 6, 8, 8])
    valid = (torch.arange(8)[None] < lengths[:, None]).long()
    rollout = Rollout(
        prompt_ids=torch.ones(6, 2, dtype=torch.long),
        prompt_mask=torch.ones(6, 2, dtype=torch.long),
        response_ids=torch.ones(6, 8, dtype=torch.long),
        valid_mask=valid,
        prompts=["p"] * 6,
        completions=["c"] * 6,
        finished=torch.tensor([True, True, True, True, True, False]),
    )

    class State:  # train_scores_of reads only the running moments, off here
        score_moments = None

    # R_length = [0, 0, (4 - 5) / 4, (4 - 6) / 4, -1, -1] = [0, 0, -0.25, -0.5, -1, -1], x 0.5;
    # the last one also ends without EOS: -0.7
    expected = [1.0, 1.0, 0.875, 0.75, 0.5, 1.0 - 0.5 - 0.7]
    assert train_scores_of([1.0] * 6, rollout, State(), cfg) == pytest.approx(expected, abs=1e-9)
    # the negative control: without the buffer, only the missing EOS costs
    plain = train_scores_of([1.0] * 6, rollout, State(), cfg.replace(overlong_buffer=None))
    assert plain == pytest.approx([1.0] * 5 + [0.3], abs=1e-9)


def test_the_new_options_reach_every_rl_command(tmp_path):
    """Declared once in the RL and KL groups: detox and hacking-demo take them as they are,
    cai's RL stage as --rl-...; cai refuses the same nonsense (its max_new_tokens bounds the
    overlong buffer)."""
    new = dict(
        advantage="grpo",
        policy_loss="sapo",
        cliprange_high=0.28,
        dynamic_sampling=True,
        overlong_buffer=8,
        kl_bias_correction=True,
    )
    for cls in (DetoxConfig, HackingDemoConfig):
        cfg = cls.from_flat(out=str(tmp_path / cls.__name__), **new)
        assert (cfg.rl.policy_loss, cfg.rl.loss_aggregation) == ("sapo", "seq-mean-token-mean")
        assert cfg.kl.kl_bias_correction and cfg.rl.overlong_buffer == 8
    cai = CaiConfig.from_flat(out=str(tmp_path / "cai"), **{f"rl_{k}": v for k, v in new.items()})
    # (the stage's TrainConfig copies these two groups whole: cai.pipeline.rl_config)
    assert cai.rl.policy_loss == "sapo" and cai.rl.cliprange_high == 0.28
    assert cai.rl.dynamic_sampling and cai.rl_kl.kl_bias_correction
    with pytest.raises(TetherError, match="max_new_tokens 48"):
        CaiConfig.from_flat(out=str(tmp_path / "cai2"), rl_overlong_buffer=49)
    with pytest.raises(TetherError, match="--advantage gae learns a per-token critic"):
        CaiConfig.from_flat(out=str(tmp_path / "cai3"), rl_policy_loss="gspo")


def test_kl_bias_correction_trains_with_the_weighted_k3_in_the_loss(
    tiny_llama, prompts_file, vowel_reward, tmp_path, monkeypatch
):
    """--kl-bias-correction puts ppo.importance_weighted_k3 of the micro-batch in the loss (the
    update's calls are recorded), and its value at the first mini-batch (ratio 1) is k3's."""
    calls = []
    weighted = ppo.importance_weighted_k3

    def spy(logprobs, old_logprobs, ref_logprobs):
        out = weighted(logprobs, old_logprobs, ref_logprobs)
        calls.append((out.detach(), ppo.kl_estimate(logprobs, ref_logprobs, "k3").detach()))
        return out

    monkeypatch.setattr(ppo, "importance_weighted_k3", spy)
    cfg = tiny_run_config(
        tiny_llama,
        prompts_file,
        tmp_path / "run",
        reward=f"python:{vowel_reward}:vowels",
        advantage="grpo",
        kl_bias_correction=True,
        steps=2,
        batch_size=8,
        mini_batch_size=4,
        lr=2e-2,
        kl_coef=0.5,
    )
    rows = train(cfg).metrics
    assert len(calls) == 2 * 2 * 2 * 2  # steps x epochs x mini-batches x micro-batches (CPU: 2)
    torch.testing.assert_close(calls[0][0], calls[0][1], atol=1e-5, rtol=1e-5)
    assert any(not torch.allclose(w, k3, atol=1e-5) for w, k3 in calls[4:])  # off-policy later
    assert all(math.isfinite(r["kl_loss"]) for r in rows)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["kl_bias_correction"] is True
