"""The classic FLAN-T5 walkthrough on tiny stand-ins: seq2seq through the CLI, a starting SFT
adapter as the reference, and the shipped recipes parsing and running."""

import json

import yaml
from conftest import save_sft_adapter

from tether.cli import main


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
