"""benchmarks/gpu_step.py kept alive without a GPU: its `--cpu` mode runs the GPU benchmark's
flow on tiny models built from the same config files, and the config files hold the shapes
they are named after."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_step  # noqa: E402


def _env() -> dict[str, str]:
    # the interpreter finds this checkout's tether first, whichever one is installed
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "name, millions",
    # Qwen2.5-0.5B: 494.0M, SmolLM2-360M: 361.8M (their model cards); FLAN-T5-base 247.6M with
    # its own lm_head, but transformers 5 always ties T5's lm_head to the embeddings: 222.9M
    [("qwen", 494.0), ("smollm2", 361.8), ("t5", 222.9)],
)
def test_config_files_hold_the_models_shapes(name, millions):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = gpu_step.model_config(name, tiny=False)
    auto = AutoModelForSeq2SeqLM if cfg.get("is_encoder_decoder") else AutoModelForCausalLM
    with torch.device("meta"):  # shapes only: no memory, no init
        model = auto.from_config(AutoConfig.for_model(**cfg))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_gpu_step_runs_on_the_cpu(tmp_path):
    """The whole flow, tiny: every run's phases, a positive decode floor, finite figures, the
    GPU path's choices recorded (SDPA, no Llama step for Qwen, a float32 adapter)."""
    out = tmp_path / "gpu_step.json"
    runs = "qwen:grpo:eager,qwen:grpo:static,t5:gae:eager"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--runs", runs, "--save", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["runs"] == record["runs"]
    assert "s/step" in proc.stdout and "decode ms/tok" in proc.stdout
    for key in ("date", "machine", "tether", "revision", "torch", "transformers"):
        assert record[key]
    assert record["complete"]
    assert [r["run"] for r in record["runs"]] == runs.split(",")
    for r in record["runs"]:
        assert r["tool"] == "tether" and r["device"] == "cpu"
        assert set(r["phases"]) == set(gpu_step.PHASES)
        figures = [r["step_s"], r["gen_s"], r["decode_ms"], r["floor_ms"], r["peak_mb"]]
        figures += [r["gen_tokens_per_s"], r["copy_gbps"], *r["phases"].values()]
        assert all(math.isfinite(x) and x >= 0 for x in figures)
        assert r["floor_ms"] > 0 and r["weight_mb"] > 0 and r["kv_mb"] > 0
        assert r["response_len"] == r["new_tokens"] == 8  # min = max new tokens
        assert r["attention"] == "sdpa"
        assert r["lora_dtypes"] == ["torch.float32"]
        assert not r["llama_step"]  # Qwen2 and T5 are not Llama classes
    grpo, static, gae = record["runs"]
    assert grpo["batch"] == gae["batch"] == 4 and grpo["group_size"] == 2 and gae["group_size"] == 1


def test_each_run_in_its_own_process_as_on_a_gpu(tmp_path):
    """--spawn (the default off --cpu): the parent builds the model dir, a child process runs
    and reports; a run that cannot run is reported as skipped, with the reason."""
    out = tmp_path / "gpu_step.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--spawn", "--steps", "2", "--save", str(out)]
        + ["--runs", "qwen:gae:eager,t5:trl:eager"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    gae, trl = json.loads(out.read_text())["runs"]
    assert gae["run"] == "qwen:gae:eager" and gae["steps_timed"] == 1 and gae["floor_ms"] > 0
    assert trl == {"run": "t5:trl:eager", "skipped": "TRL's GRPOTrainer is causal-only"}


def test_runs_are_checked_with_the_values():
    with pytest.raises(SystemExit, match="'llama:grpo:eager'"):
        gpu_step.parse_runs("llama:grpo:eager")
    with pytest.raises(SystemExit, match="'qwen:ppo:eager'"):
        gpu_step.parse_runs("qwen:ppo:eager")
    assert gpu_step.parse_runs(gpu_step.RUNS)[0] == ("qwen", "grpo", "eager")
