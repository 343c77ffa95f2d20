"""`--dtype` and `--device`: half precision trains (LoRA and value head stay float32), `auto`
picks CUDA only when there is one, and an absent device is one line, not a traceback."""

import math

import pytest
import torch

from tether.cli import main
from tether.config import TrainConfig
from tether.models import resolve_device
from tether.trainer import train

# device-capable: `--device auto` is CUDA where there is one (benchmarks/device_check.sh)
pytestmark = pytest.mark.device


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_trains_float32_adapter(
    dtype, tiny_t5, prompts_file, scorers_file, tmp_path
):
    cfg = TrainConfig.from_flat(
        policy=str(tiny_t5),
        # varies from the first batch on, so the first update is real
        reward=f"python:{scorers_file}:vowels",
        prompts=f"jsonl:{prompts_file}",
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        mini_batch_size=2,
        max_new_tokens=6,
        lr=0.01,
        dtype=dtype,
        judge_every=0,
        save_every=0,
        progress=False,
    )
    result = train(cfg)
    policy = result.policy
    frozen = {p.dtype for p in policy.model.parameters() if not p.requires_grad}
    assert getattr(torch, dtype) in frozen  # the base runs in half precision
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    assert any(p.abs().max() > 0 for n, p in policy.model.named_parameters() if "lora_B" in n)
    for row in result.metrics:
        assert all(math.isfinite(row[k]) for k in ("kl_mean", "policy_loss", "value_loss"))


def test_auto_device_is_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_absent_cuda_device_is_one_line(tiny_llama, prompts_file, reward_file, tmp_path, capsys):
    argv = ["train", "--policy", str(tiny_llama), "--reward", f"python:{reward_file}:frac_a"]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "run")]
    assert main([*argv, "--device", "cuda:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --device cuda:1: this machine has 0 CUDA device(s); use --device auto or cpu"
    ]
