"""Two processes under `accelerate launch --cpu` (gloo): the same weights on both ranks after
training, each rank on its own prompts, and only rank 0 writing the run directory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.cli import main

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
DDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"

DRIVER = """
import json, sys
from safetensors.torch import save_file
from tether import distributed
from tether.config import TrainConfig
from tether.trainer import train

out_dir = sys.argv[1]
result = train(TrainConfig(**json.loads(sys.argv[2])))
r = distributed.rank()
weights = {n: p.detach().contiguous() for n, p in result.policy.named_parameters() if p.requires_grad}
save_file(weights, f"{out_dir}/rank{r}.safetensors")
info = {"world": distributed.world_size(), "rows": result.metrics, "run_dir": str(result.run_dir)}
open(f"{out_dir}/rank{r}.json", "w").write(json.dumps(info))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path(ACCELERATE).is_file(), reason="the accelerate launcher is missing")
@pytest.mark.parametrize(
    "estimator",
    [{}, {"advantage": "grpo", "group_size": 2, "kl_estimator": "full"}],
    ids=["gae", "grpo-full-kl-in-loss"],
)
def test_two_processes_train_the_same_weights_and_rank0_alone_writes(
    tiny_llama, prompts_file, reward_file, tmp_path, estimator
):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    cfg = {
        "policy": str(tiny_llama),
        "reward": f"python:{reward_file}:frac_a",
        "prompts": f"jsonl:{prompts_file}",
        "out": str(run),
        "steps": 3,
        "batch_size": 4,
        "mini_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_new_tokens": 6,
        "lr": 0.05,
        "target_kl": 0.5,
        "score_norm": True,
        "judge_every": 3,  # guard probes at the start and after the last step, on both ranks
        "save_every": 2,
        "progress": False,
        **estimator,
    }
    # the shipped DDP config; without GPUs its processes run on CPU over gloo. (`accelerate
    # launch --cpu --num_processes 2` starts one process: Accelerate 1.x needs mpirun for more.)
    launch = [ACCELERATE, "launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2"]
    launch += ["--main_process_port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launch, str(driver), str(tmp_path), json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [info["world"] for info in ranks] == [2, 2]
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) > 2
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were averaged, bit for bit
    assert any(w0[k].abs().max() > 0 for k in w0 if "lora_B" in k)  # and training moved them

    # the metrics are means over both ranks, identical on both; the KL coefficient moved in step
    def shared(row):  # each process times its own guard
        return {k: v for k, v in row.items() if k != "guard_seconds"}

    assert [shared(r) for r in ranks[0]["rows"]] == [shared(r) for r in ranks[1]["rows"]]
    assert len({row["kl_coef"] for row in ranks[0]["rows"]}) > 1
    # rank 0 wrote the run directory once: 3 metric rows, not 6; rank 1 wrote nothing there
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "guard.json").is_file() and (run / "guard" / "reference.jsonl").is_file()
    assert (run / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    final = load_file(run / "final" / "adapter_model.safetensors")
    assert len(final) > 0


@pytest.mark.parametrize("engine", ["DEEPSPEED", "FSDP"])
def test_sharded_engines_are_refused_in_one_line(
    engine, tiny_llama, prompts_file, reward_file, tmp_path, monkeypatch, capsys
):
    """A DeepSpeed or FSDP launch would silently run plain data parallel: say so instead."""
    monkeypatch.setenv(f"ACCELERATE_USE_{engine}", "true")
    argv = ["train", "--policy", str(tiny_llama), "--reward", f"python:{reward_file}:frac_a"]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"launched with {engine.lower()}" in err[0]
    assert "configs/accelerate/ddp.yaml" in err[0] and not (tmp_path / "run").exists()
