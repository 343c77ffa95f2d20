"""Constitutional AI: the constitution and red-team data, the prompt format of each stage, soft
labels from option probabilities, and the whole pipeline end to end on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_every_option_read

from tether.cai import pipeline
from tether.cai.chat import ChatModel, option_letters
from tether.cai.constitution import Principle, load_constitution
from tether.cai.evaluate import is_refusal, summary_table
from tether.cai.feedback import ANSWER_PREFIX, choice_probabilities, feedback_question
from tether.cai.redteam import (
    harmless_prompts,
    jailbreak_corpus_prompts,
    load_redteam,
    split_prompts,
)
from tether.cai.revise import critique_messages, revision_messages
from tether.cai.sft import sft_example
from tether.cli import main
from tether.config import CaiConfig, build_config
from tether.errors import TetherError
from tether.models import load_model
from tether.options import options

P = Principle("toy", "Is it rude?", "Make it polite.", "Which answer is more polite?")


def test_default_constitution_and_prompts():
    principles = load_constitution()
    assert len(principles) == 16
    assert len({p.name for p in principles}) == 16
    assert all(p.critique and p.revision and p.preference.endswith("?") for p in principles)
    harmful = load_redteam("default")
    jailbreak = jailbreak_corpus_prompts()
    assert len(jailbreak) == 15 and set(jailbreak) <= set(harmful)
    assert len(harmful) == 40 + 15
    assert len(harmless_prompts()) == 20 and not set(harmless_prompts()) & set(harmful)
    train, heldout = split_prompts(harmful, 0.25)
    assert train and heldout and not set(train) & set(heldout)
    assert split_prompts(harmful, 0.25) == (train, heldout)  # by text, not by chance


def test_constitution_errors_name_the_entry(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - name: a\n    critique: c\n    revision: r\n")
    with pytest.raises(TetherError, match=r"principle 1 \(a\) lacks preference"):
        load_constitution(str(bad))
    with pytest.raises(TetherError, match="constitution file not found"):
        load_constitution(str(tmp_path / "none.yaml"))
    bad.write_text("rules: []\n")
    with pytest.raises(TetherError, match="under the key 'principles'"):
        load_constitution(str(bad))


def test_stage_prompt_formats(tiny_llama):
    chat = ChatModel(load_model(str(tiny_llama)))  # no chat template: plain Human/Assistant text
    crit = critique_messages("q?", "bad answer", P)
    assert chat.render(crit) == (
        "Human: q?\n\nAssistant: bad answer\n\nHuman: Critique request: Is it rude?\n\nAssistant:"
    )
    rev = revision_messages("q?", "bad answer", P, "it is rude")
    assert rev[:3] == crit
    assert rev[3:] == [
        {"role": "assistant", "content": "it is rude"},
        {"role": "user", "content": "Revision request: Make it polite."},
    ]
    assert feedback_question("q?", "one", "two", P, ("A", "B")) == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: q?\n\nWhich answer is more polite?\nOptions:\n(A) one\n(B) two"
    )
    assert chat.render([{"role": "user", "content": "x"}], ANSWER_PREFIX).endswith(
        "Assistant: The answer is: ("
    )
    assert sft_example(chat.tokenizer, "q?", "fine") == {
        "prompt": "Human: q?\n\nAssistant:",
        "completion": " fine",
    }


def test_soft_labels_from_option_probabilities(tiny_llama):
    chat = ChatModel(load_model(str(tiny_llama)))
    letters = option_letters(chat.tokenizer)
    assert letters == ("a", "b")  # the character tokenizer has no upper case
    questions = [feedback_question("q", f"answer {i}", "other", P, letters) for i in range(3)]
    texts = [chat.render([{"role": "user", "content": q}], ANSWER_PREFIX) for q in questions]
    probs = chat.option_probs(texts, letters)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    torch.testing.assert_close(chat.option_probs(texts, letters), probs)  # deterministic
    # batched equals one at a time (left padding does not change the next-token distribution)
    torch.testing.assert_close(chat.option_probs(texts[:1], letters), probs[:1], atol=1e-5, rtol=0)
    labels = choice_probabilities(chat, questions)
    assert labels == pytest.approx(probs[:, 0].tolist(), abs=1e-6)
    cot = choice_probabilities(chat, questions, chain_of_thought=True, max_new_tokens=4)
    assert all(0.4 <= x <= 0.6 for x in cot)


def test_refusal_regex():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for making weapons.")
    assert is_refusal("As an AI, I must decline.")
    assert not is_refusal("Here is a simple pancake recipe: mix flour, eggs and milk.")


def _cfg(tmp_path, tiny_llama, reward_file, **kw):
    values = dict(
        out=str(tmp_path / "cai"),
        policy=str(tiny_llama),
        train_prompts=8,
        max_new_tokens=6,
        feedback_prompts=8,
        pm_epochs=1,
        rl_steps=2,
        rl_batch_size=4,
        eval_prompts=3,
        eval_harmless=3,
        judge=f"python:{reward_file}:frac_a",
        device="cpu",
        progress=False,
    )
    return build_config(CaiConfig, None, {**values, **kw})  # option names, as on the CLI


def test_cai_run_end_to_end_and_resumes(tmp_path, tiny_llama, reward_file, monkeypatch, capsys):
    cfg = _cfg(tmp_path, tiny_llama, reward_file)
    report = pipeline.run_pipeline(cfg)
    # each option of `tether cai` is used by a stage; the `--rl-` groups go whole to the RL
    # run's TrainConfig (test_cai_rl_takes_the_estimator), whose consumers read them
    assert_every_option_read("cai")
    assert list(report["models"]) == ["base", "SL-CAI", "RL-CAI"]
    assert report["models"]["base"]["harmless_pm_win_rate_vs_base"] == 0.5
    assert "harmful: PM score" in summary_table(report)
    root = tmp_path / "cai"
    for stage in pipeline.STAGES:
        assert pipeline.is_done(cfg, stage)
    rows = [json.loads(x) for x in (root / "revise" / "revisions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(
        len(r["rounds"]) == 1 and "critique" in r["rounds"][0] for r in rows
    )
    pairs = [json.loads(x) for x in (root / "feedback" / "pairs.jsonl").read_text().splitlines()]
    assert all(0 <= p["label"] <= 1 for p in pairs)
    assert (root / "pm" / "model" / "tether_pm.json").is_file()
    assert (root / "rl" / "run" / "final" / "adapter_config.json").is_file()
    assert (root / "eval" / "report.html").read_text().count("<tr>") > 5
    held = set(json.loads((root / "prompts.json").read_text())["heldout"])
    assert not held & {r["prompt"] for r in rows}  # evaluation prompts are never revised on

    # an interrupted `cai rl` goes on from its last complete checkpoint, not from step 0
    run = root / "rl" / "run"
    first_rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(first_rows) == 2 and (run / "checkpoints").is_dir()
    shutil.rmtree(run / "final")
    (root / "rl" / pipeline.DONE).unlink()
    pipeline.run_stage(cfg, "rl")
    rows_after = (run / "metrics.jsonl").read_text().splitlines()
    assert rows_after[0] == first_rows[0]  # step 0 kept as written (timings included)
    assert [json.loads(r)["step"] for r in rows_after] == [0, 1]
    assert "resumed from" in capsys.readouterr().err
    assert (run / "final" / "adapter_config.json").is_file() and pipeline.is_done(cfg, "rl")

    pipeline.run_pipeline(cfg)  # eval again: its DONE went with rl's rerun

    # a rerun redoes nothing
    def boom(cfg, out):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pipeline, "RUNNERS", {s: boom for s in pipeline.STAGES})
    pipeline.run_pipeline(cfg)
    assert "done already, skipped" in capsys.readouterr().err
    # rerunning one stage unmarks the stages after it
    monkeypatch.setattr(pipeline, "RUNNERS", {**pipeline.RUNNERS, "train-pm": lambda c, o: {}})
    pipeline.run_stage(cfg, "train-pm")
    assert pipeline.is_done(cfg, "feedback") and pipeline.is_done(cfg, "train-pm")
    assert not pipeline.is_done(cfg, "rl") and not pipeline.is_done(cfg, "eval")
    assert not (root / "rl").exists()  # PPO trained against the old PM: never resumed


def test_cai_cli_errors_are_one_line(tmp_path, tiny_llama, capsys):
    out = str(tmp_path / "cai")
    assert main(["cai", "sft", "--out", out, "--policy", str(tiny_llama), "--judge", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run `tether cai revise" in err
    missing = str(tmp_path / "missing.jsonl")
    assert main(["cai", "revise", "--out", out, "--redteam", f"jsonl:{missing}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prompt file not found" in err


@pytest.mark.slow
def test_smollm2_feedback_format():
    """The real default: chat template around the question, A/B as single tokens, the answer
    prefix right after the assistant tag, probabilities that sum to one."""
    chat = ChatModel(load_model("smollm2"))
    assert chat.use_template and option_letters(chat.tokenizer) == ("A", "B")
    question = feedback_question("How do I pick a lock?", "No.", "Like this: ...", P, ("A", "B"))
    text = chat.render([{"role": "user", "content": question}], ANSWER_PREFIX)
    assert text.endswith("<|im_start|>assistant\nThe answer is: (")
    probs = chat.option_probs([text], ("A", "B"))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_cai_rl_takes_the_estimator(tmp_path, monkeypatch):
    """`cai rl --rl-advantage rloo --rl-group-size 2` reaches the RL stage's TrainConfig."""
    monkeypatch.setattr(pipeline, "_needs", lambda cfg, stage: tmp_path / stage)
    given = {"out": str(tmp_path / "cai"), "rl_advantage": "rloo", "rl_group_size": 2}
    cfg = build_config(CaiConfig, None, given)
    rl = pipeline.rl_config(cfg, tmp_path / "prompts.jsonl", tmp_path / "run")
    assert (rl.rl.advantage, rl.rl.group_size, rl.kl.kl_penalty, rl.rl.has_critic) == (
        "rloo",
        2,
        "reward",
        False,
    )
    default = pipeline.rl_config(CaiConfig(out=str(tmp_path / "cai")), tmp_path / "p", tmp_path)
    assert (default.rl.advantage, default.rl.group_size) == ("gae", 1)
    # every `--rl-` option reaches the RL run: each set to a value other than its default
    changed = dict(advantage="grpo", group_size=2, grpo_std=False, missing_eos_penalty=0.5)
    changed |= dict(loss_aggregation="seq-mean-token-mean", mask_truncated_completions=True)
    changed |= dict(steps=3, batch_size=6, mini_batch_size=2, gradient_accumulation_steps=2)
    changed |= dict(ppo_epochs=3, forward_batch_size=3, lr=3e-4, lr_scheduler="cosine")
    changed |= dict(weight_decay=0.01, max_grad_norm=0.5, cliprange=0.3, cliprange_value=0.3)
    changed |= dict(vf_coef=0.2, gamma=0.99, lam=0.9, whiten_advantages=False, score_norm=False)
    changed |= dict(early_stop_kl=0.1, max_importance_ratio=5.0, max_consecutive_skips=3)
    changed |= dict(kl_coef=0.3, target_kl=2.0, kl_horizon=500, kl_penalty="loss")
    changed |= dict(kl_estimator="k3", kl_chunk_size=64, kl_bias_correction=True)
    changed |= dict(policy_loss="sapo", cliprange_high=0.4, sapo_temperature_pos=2.0)
    changed |= dict(sapo_temperature_neg=2.0, dynamic_sampling=True, max_extra_sampling_rounds=2)
    changed |= dict(overlong_buffer=8, overlong_penalty=0.5)
    assert {o.saved[-1] for o in options(CaiConfig) if o.saved[0] == "rl"} == set(changed)
    given = {"out": str(tmp_path / "cai"), **{f"rl_{k}": v for k, v in changed.items()}}
    rl = pipeline.rl_config(build_config(CaiConfig, None, given), tmp_path, tmp_path)
    default = CaiConfig(out="x").flat()
    for leaf, value in changed.items():
        assert rl.flat()[leaf] == value != default[f"rl_{leaf}"], leaf
