"""The classic FLAN-T5 walkthrough on tiny stand-ins: seq2seq through the CLI, a starting SFT
adapter as the reference, and the shipped recipes parsing and running."""

import json
from pathlib import Path

import yaml
from conftest import save_sft_adapter

from tether.cli import main
from tether.config import DetoxConfig, EvalConfig, build_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_smollm2_recipe_is_the_embedded_default():
    from_file = build_config(DetoxConfig, str(RECIPES / "detox-smollm2.yaml"), {"out": "x"})
    assert from_file == DetoxConfig.from_flat(out="x")


def test_flan_t5_recipe_also_configures_eval():
    """The README's `tether eval --config recipes/detox-flan-t5.yaml --trained ...`."""
    cfg = build_config(EvalConfig, str(RECIPES / "detox-flan-t5.yaml"), {"out": "x"})
    assert cfg.model.policy == "google/flan-t5-base" and cfg.task.prompts == "dialogsum@200-1000"
    assert cfg.task.reward == "hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate@logit"
    assert cfg.eval.eval_samples == 25  # the GPU recipe samples as RealToxicityPrompts does


def test_train_seq2seq_from_an_sft_adapter_starts_at_zero_kl(
    tiny_t5, prompts_file, reward_file, tmp_path, capsys
):
    """`tether train` on T5 with --adapter: the reference is the starting (adapted) policy, so the
    first step's KL is ~0, although the adapter moves the model far from the raw base."""
    sft = save_sft_adapter(tiny_t5, tmp_path / "sft")
    out = tmp_path / "run"
    argv = ["train", "--policy", str(tiny_t5), "--adapter", str(sft), "--out", str(out)]
    argv += ["--reward", f"python:{reward_file}:frac_a", "--prompts", f"jsonl:{prompts_file}"]
    argv += ["--steps", "2", "--batch-size", "4", "--mini-batch-size", "2"]
    assert main([*argv, "--max-new-tokens", "8", "--judge-every", "0", "--no-progress"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl_mean"]) < 1e-4 and rows[0]["response_len_mean"] > 1
    assert yaml.safe_load((out / "config.yaml").read_text())["adapter"] == str(sft)

    # evaluating that PPO adapter without the starting adapter would score another model
    argv = ["eval", "--policy", str(tiny_t5), "--trained", str(out / "final"), "--no-progress"]
    argv += [
        "--reward",
        f"python:{reward_file}:frac_a",
        "--judge",
        f"python:{reward_file}:constant",
    ]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "eval")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: --trained {out / 'final'} was trained from starting adapter {sft} (its "
        f"config.yaml), but this eval starts from None: pass --adapter {sft}"
    )


def test_flan_t5_recipe_runs_with_tiny_stand_ins(
    tiny_t5, tiny_classifier, dialogsum_csv, scorers_file, tmp_path, capsys
):
    """`tether detox --config recipes/detox-flan-t5.yaml` with a tiny T5 (and its SFT adapter),
    a tiny local classifier for the hub reward, and DialogSum-shaped data; tiny sizes only."""
    sft = save_sft_adapter(tiny_t5, tmp_path / "sft")
    out = tmp_path / "run"
    argv = ["detox", "--config", str(RECIPES / "detox-flan-t5.yaml"), "--out", str(out)]
    argv += ["--policy", str(tiny_t5), "--adapter", str(sft)]
    argv += [
        "--reward",
        f"hf:{tiny_classifier}:nothate@logit",
        "--judge",
        f"python:{scorers_file}:spaces",
    ]
    argv += ["--prompts", f"dialogsum:{dialogsum_csv}@200-1000", "--max-prompt-tokens", "48"]
    argv += ["--steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "8"]
    argv += ["--eval-prompts", "4", "--eval-batch-size", "4", "--eval-samples", "1"]
    argv += ["--no-similarity", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    walkthrough = {
        "lora_r": 32,
        "lora_alpha": 32,
        "lora_target_modules": ["q", "v"],
        "lr": 1.41e-5,
        "batch_size": 4,  # overridden
        "mini_batch_size": 2,  # overridden
        "ppo_epochs": 1,
        "target_kl": 6.0,
        "kl_coef": 0.2,
        "dtype": "bfloat16",
        "policy": str(tiny_t5),
    }
    assert {k: saved[k] for k in walkthrough} == walkthrough
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and sorted(adapter["target_modules"]) == ["q", "v"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_coef"] == 0.2 and abs(rows[0]["kl_mean"]) < 1e-3
    report = json.loads((out / "report.json").read_text())
    assert report["toxicity"]["proxy"]["metric"] == f"hf:{tiny_classifier}:nothate@logit score"
    assert f"starting adapter {sft} merged in" in report["reference"]
    assert {"rouge1", "rouge2", "rougeL"} <= report["quality"].keys()
