"""Two processes under `accelerate launch` (gloo on CPU), on torch's DDP and FSDP2: the same
weights on every rank, each rank on its own prompts, only rank 0 writing the run directory; two
processes end where one process trained on the same global batch ends; early stop decided alike
on every rank; a killed two-process run resumes; checkpoints move between one process and two."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import assert_close_nested, resume_argv
from safetensors.torch import load_file

import tether
from tether.cli import main
from tether.config import TrainConfig
from tether.options import field_type, options
from tether.rundir import COMPLETE, load_trainer_state
from tether.state import TrainState
from tether.trainer import build_policy, train

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
DDP_CONFIG = CONFIGS / "ddp.yaml"
ENGINES = {"ddp": DDP_CONFIG, "fsdp2": CONFIGS / "fsdp2.yaml"}
SRC = str(Path(tether.__file__).resolve().parents[1])  # this checkout's src/, for subprocesses

needs_launcher = pytest.mark.skipif(
    not Path(ACCELERATE).is_file(), reason="the accelerate launcher is missing"
)

DRIVER = """
import json, sys
import torch
from safetensors.torch import save_file
import tether.trainer
from tether import distributed
from tether.config import TrainConfig
from tether.trainer import train

updates = []  # this rank's own (epochs run, early stopped) per step, before any averaging
_update = tether.trainer.ppo_update
def recording_update(*args, **kwargs):
    stats = _update(*args, **kwargs)
    updates.append([stats["ppo_epochs_run"], stats["early_stopped"]])
    return stats
tether.trainer.ppo_update = recording_update

out_dir = sys.argv[1]
_restore = tether.trainer.restore
def recording_restore(run, policy, state):  # what a resumed run starts from, gathered
    step = _restore(run, policy, state)
    weights = {n: distributed.full(p).detach().clone() for n, p in policy.named_parameters()
               if p.requires_grad}
    torch.save({"weights": weights, "optimizer": state.state_dict()["optimizer"]},
               f"{out_dir}/restored{distributed.rank()}.pt")
    return step
tether.trainer.restore = recording_restore

result = train(TrainConfig.from_flat(**json.loads(sys.argv[2])))
r = distributed.rank()
trainable = [(n, p) for n, p in result.policy.named_parameters() if p.requires_grad]
weights = {n: distributed.full(p).detach().contiguous() for n, p in trainable}
save_file(weights, f"{out_dir}/rank{r}.safetensors")
base = [p for p in result.policy.parameters() if not p.requires_grad]
info = {
    "world": distributed.world_size(),
    "engine": result.policy.engine,
    "rows": result.metrics,
    "run_dir": str(result.run_dir),
    "updates": updates,
    "base_numel": sum(p.numel() for p in base),
    "base_local_numel": sum(distributed.local(p).numel() for p in base),
}
open(f"{out_dir}/rank{r}.json", "w").write(json.dumps(info))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(config: Path, *argv: str) -> list[str]:
    """`accelerate launch` of two processes with the shipped config: without GPUs its
    processes run on CPU over gloo. (`accelerate launch --cpu --num_processes 2` starts one
    process: Accelerate 1.x needs mpirun for more.)"""
    launch = [ACCELERATE, "launch", "--config_file", str(config), "--num_processes", "2"]
    return [*launch, "--main_process_port", str(_free_port()), *argv]


def _env() -> dict[str, str]:
    # one thread a process: two processes share the 2 cores
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _run_driver(tmp_path: Path, config: Path, cfg: dict) -> tuple[list[dict], str]:
    """DRIVER under two processes: each rank's info, in rank order, and the launch's stderr."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = _launch_cmd(config, str(driver), str(tmp_path), json.dumps(cfg))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)], proc.stderr


@needs_launcher
@pytest.mark.parametrize(
    "engine, estimator",
    [
        ("ddp", {}),
        ("ddp", {"advantage": "grpo", "group_size": 2, "kl_estimator": "full"}),
        ("fsdp2", {"advantage": "grpo", "group_size": 2}),
        # frac_a is 0 for most tiny completions: constant groups, dropped and resampled in
        # rounds that every rank must run alike (the sharded generation is collective)
        (
            "fsdp2",
            {
                "advantage": "grpo",
                "group_size": 2,
                "dynamic_sampling": True,
                "max_extra_sampling_rounds": 2,
            },
        ),
    ],
    ids=["gae", "grpo-full-kl-in-loss", "fsdp2-grpo", "fsdp2-grpo-dynamic-sampling"],
)
def test_two_processes_train_the_same_weights_and_rank0_alone_writes(
    tiny_llama, prompts_file, reward_file, tmp_path, engine, estimator
):
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
    ranks, _ = _run_driver(tmp_path, ENGINES[engine], cfg)
    assert [info["world"] for info in ranks] == [2, 2]
    assert [info["engine"] for info in ranks] == [engine, engine]
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys() and len(w0) > 2
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were averaged, bit for bit
    assert any(w0[k].abs().max() > 0 for k in w0 if "lora_B" in k)  # and training moved them

    # the metrics are means over both ranks, identical on both; the KL coefficient moved in step
    def shared(row):  # each process times its own guard
        return {k: v for k, v in row.items() if k != "guard_seconds"}

    assert [shared(r) for r in ranks[0]["rows"]] == [shared(r) for r in ranks[1]["rows"]]
    assert len({row["kl_coef"] for row in ranks[0]["rows"]}) > 1
    if estimator.get("dynamic_sampling"):  # groups were dropped, in more than one round
        assert any(r["dropped_groups"] > 0 and r["sampling_rounds"] > 1 for r in ranks[0]["rows"])
    # rank 0 wrote the run directory once: 3 metric rows, not 6; rank 1 wrote nothing there
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "guard.json").is_file() and (run / "guard" / "reference.jsonl").is_file()
    assert (run / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    assert not [p for p in run.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    final = load_file(run / "final" / "adapter_model.safetensors")
    assert len(final) > 0


@pytest.mark.parametrize(
    "env, named",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "launched with deepspeed"),
        ({"ACCELERATE_USE_FSDP": "true"}, "launched with fsdp"),  # Accelerate's default: FSDP1
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "launched with fsdp version 1"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
            "fsdp_offload_params",
        ),
    ],
    ids=["deepspeed", "fsdp", "fsdp1", "fsdp2-offload"],
)
def test_engines_tether_does_not_run_are_refused_in_one_line(
    env, named, tiny_llama, prompts_file, reward_file, tmp_path, monkeypatch, capsys
):
    """DeepSpeed, FSDP1 or an FSDP2 setting tether does not honour would silently run as
    something else: say so instead, naming the config to use."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--policy", str(tiny_llama), "--reward", f"python:{reward_file}:frac_a"]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
    assert "configs/accelerate/" in err[0] and not (tmp_path / "run").exists()
    if "FSDP_VERSION" not in env:  # as the test of the one-engine days asked
        assert "configs/accelerate/ddp.yaml" in err[0]


# ----------------------------------------------------------------------------------------------
# two processes = one process on the global batch
# ----------------------------------------------------------------------------------------------

# Adapter entries of two processes and of one process on the same global batch agree to this
# (measured: at most 3.3e-7 over the four cases, float reduction order); one process trained on
# rank 0's half of the prompts alone lands ~0.1 away, and training moves entries by ~0.06: both
# are asserted to be far beyond it, so the tolerance can tell the batches apart.
ADAPTER_TOL = 1e-5


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _trainable(policy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


# what the two models run besides: Llama the KL estimate in the reward, T5 the exact KL in the
# loss (a reference pass inside every update micro-batch, adapter off, on the same engine)
KL_SETTINGS = {"llama": {}, "t5": {"kl_penalty": "loss", "kl_estimator": "full"}}


@needs_launcher
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("model", ["llama", "t5"])
def test_two_processes_end_where_one_process_on_the_global_batch_ends(
    engine, model, tiny_llama, tiny_t5, prompts_file, tmp_path
):
    """Two processes of 4 completions each (their own 4 of the 8 prompts) against one process of
    8 (all of them), greedy decoding so both sample the same completions: 3 steps of up to 4
    epochs, a mini-batch of the whole batch in micro-batches of 2 (accumulation: DDP's no_sync,
    FSDP2's deferred reduce-scatter), token-mean loss (normalised by the global token count),
    whitened advantages, normalised scores and an adaptive KL coefficient (all over the global
    batch), early stop on the global approx-KL. Same adapter, same rows, same early stops."""
    # a reward that differs between prompts: the tiny T5's greedy completions are all alike, and
    # all-equal rewards leave advantages of float noise, which Adam turns into real steps
    reward = tmp_path / "by_prompt.py"
    reward.write_text(
        "def score(prompts, completions):\n"
        "    return [len(p) / 10 + c.count('a') / max(len(c), 1)\n"
        "            for p, c in zip(prompts, completions, strict=True)]\n"
    )
    shape = {
        "policy": str({"llama": tiny_llama, "t5": tiny_t5}[model]),
        "reward": f"python:{reward}:score",
        "prompts": f"jsonl:{prompts_file}",
        "steps": 3,
        "ppo_epochs": 4,
        "early_stop_kl": 0.002,
        "max_new_tokens": 6,
        "top_k": 1,  # the argmax: what a completion is does not depend on the random stream
        "lr": 0.01,
        "lora_r": 4,
        "score_norm": True,
        "target_kl": 0.5,
        "judge_every": 0,
        "save_every": 0,
        "progress": False,
        **KL_SETTINGS[model],
    }
    per_process = {"batch_size": 4, "mini_batch_size": 4, "gradient_accumulation_steps": 2}
    cfg = {**shape, **per_process, "out": str(tmp_path / "two")}
    ranks, _ = _run_driver(tmp_path, ENGINES[engine], cfg)
    assert [info["engine"] for info in ranks] == [engine, engine]
    if engine == "fsdp2":  # each process holds about half of the base weights
        for info in ranks:
            assert 0.4 < info["base_local_numel"] / info["base_numel"] < 0.6
        assert sum(info["base_local_numel"] for info in ranks) == ranks[0]["base_numel"]
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses
    try:
        whole = {"batch_size": 8, "mini_batch_size": 8, "gradient_accumulation_steps": 4}
        one = train(TrainConfig.from_flat(**{**shape, **whole, "out": str(tmp_path / "one")}))
        half_prompts = tmp_path / "half.jsonl"  # rank 0's share: records[0::2]
        half_prompts.write_text("".join(prompts_file.read_text().splitlines(True)[0::2]))
        half = {**shape, **per_process, "prompts": f"jsonl:{half_prompts}"}
        half_run = train(TrainConfig.from_flat(**{**half, "out": str(tmp_path / "half")}))
        start = _trainable(
            build_policy(TrainConfig.from_flat(**{**shape, "out": str(tmp_path / "x")}))
        )
    finally:
        torch.set_num_threads(threads)
    w_one, w_half = _trainable(one.policy), _trainable(half_run.policy)
    diffs = {
        "two vs one": _max_diff(w0, w_one),
        "two vs half": _max_diff(w0, w_half),
        "moved": _max_diff(w_one, start),
    }
    assert diffs["two vs one"] <= ADAPTER_TOL, diffs
    assert diffs["two vs half"] > 50 * ADAPTER_TOL, diffs  # the tolerance tells batches apart
    assert diffs["moved"] > 500 * ADAPTER_TOL, diffs  # and training moved the adapter

    # the rows' global-batch numbers agree too, and so do the early stops, on every rank
    keys = ["reward_mean", "kl_mean", "kl_coef", "policy_loss", "value_loss", "kl_loss"]
    keys += ["approx_kl", "clipfrac", "ppo_epochs_run"]
    for two_row, one_row in zip(ranks[0]["rows"], one.metrics, strict=True):
        keys = [k for k in keys if k in one_row]
        assert_close_nested(
            {k: two_row[k] for k in keys}, {k: one_row[k] for k in keys}, rel=1e-4, abs=1e-6
        )
    assert ranks[0]["updates"] == ranks[1]["updates"]
    assert [u[0] for u in ranks[0]["updates"]] == [r["ppo_epochs_run"] for r in one.metrics]
    assert any(stopped for _, stopped in ranks[0]["updates"]), "early stop never fired"


# ----------------------------------------------------------------------------------------------
# resume: a killed two-process run, and checkpoints between one process and two
# ----------------------------------------------------------------------------------------------


def _train_argv(model, prompts, reward, out, steps: int) -> list[str]:
    extra = {"max-new-tokens": 6, "early-stop-kl": 0.05}
    return ["train", *resume_argv(model, prompts, reward, out, steps, **extra), "--no-progress"]


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def _n_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@needs_launcher
def test_a_killed_sharded_run_resumes_where_an_uninterrupted_one_ends(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys
):
    """Two FSDP2 processes, SIGKILLed (the launcher and both workers) after the first
    checkpoint, then `--resume` with two processes: the metrics rows (every step once), the
    adapter and the guard's best equal an uninterrupted two-process run's. The sharded run's
    checkpoint (adapter and optimiser state) then resumes in one process."""
    fsdp2 = ENGINES["fsdp2"]
    steps = 6

    def argv(out):
        return _train_argv(tiny_llama, prompts_file, reward_file, out, steps)

    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = _launch_cmd(fsdp2, "-m", "tether", *argv(full))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        _launch_cmd(fsdp2, "-m", "tether", *argv(killed)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not ((killed / "checkpoints" / "step-1" / COMPLETE).exists() and _n_rows(killed) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress within 240 s"
        time.sleep(0.01)
    # the launcher and its workers (torch's elastic agent starts them in sessions of their own)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    assert _n_rows(killed) < steps

    cmd = _launch_cmd(fsdp2, "-m", "tether", *argv(killed), "--resume")
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resumed from") == 1  # rank 0 speaks for both

    got, want = _rows(killed), _rows(full)
    assert [r["step"] for r in got] == list(range(steps))  # none twice, none missing
    for a, b in zip(want, got, strict=True):
        assert_close_nested(a, b, rel=1e-5, abs=1e-6)
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (full, killed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    best = [json.loads((d / "guard.json").read_text())["best"] for d in (full, killed)]
    assert best[0] == best[1]

    # the sharded run's files are whole: its last checkpoint resumes in one process (for a
    # longer run: --steps may change on --resume)
    ckpt = killed / "checkpoints" / "step-3"
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        longer = _train_argv(tiny_llama, prompts_file, reward_file, killed, steps + 1)
        assert main([*longer, "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"resumed from {ckpt} (step 3)" in capsys.readouterr().err
    assert [r["step"] for r in _rows(killed)] == list(range(steps + 1))
    # ... with the optimiser state the two processes saved, under the same names
    cfg = TrainConfig.from_flat(**_flags(argv(killed)))
    policy = build_policy(cfg)
    state = TrainState.create(policy, cfg)
    saved = load_trainer_state(ckpt)
    state.load_state_dict(saved)
    names = dict(policy.named_parameters())
    for name, entry in saved["optimizer"]["state"].items():
        loaded = state.optimizer.state[names[name]]
        torch.testing.assert_close(loaded["exp_avg"], entry["exp_avg"], atol=0, rtol=0)
        torch.testing.assert_close(loaded["exp_avg_sq"], entry["exp_avg_sq"], atol=0, rtol=0)


def _flags(argv: list[str]) -> dict[str, object]:
    """--name value pairs of a `train` command line, typed as TrainConfig takes them."""
    pairs = dict(zip(argv[1:-1:2], argv[2:-1:2], strict=True))
    types = {o.name: field_type(o)[0] for o in options(TrainConfig)}
    out: dict[str, object] = {"progress": False}
    for flag, value in pairs.items():
        name = flag[2:].replace("-", "_")
        out[name] = types[name](value)
    return out


@needs_launcher
def test_a_one_process_checkpoint_resumes_in_two_sharded_processes(
    tiny_llama, prompts_file, reward_file, tmp_path
):
    """One process writes the checkpoints, two FSDP2 processes resume from them: they load the
    whole adapter and optimiser state into their shards and train on, alike."""
    shape = {
        "policy": str(tiny_llama),
        "reward": f"python:{reward_file}:frac_a",
        "prompts": f"jsonl:{prompts_file}",
        "batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 6,
        "lr": 0.01,
        "lora_r": 4,
        "save_every": 1,
        "judge_every": 0,
        "progress": False,
    }
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig.from_flat(**shape, out=str(out), steps=3))
    finally:
        torch.set_num_threads(threads)
    rows_before = _rows(out)
    ckpt = out / "checkpoints" / "step-1"
    cfg = {**shape, "out": str(out), "steps": 5, "resume": True}
    ranks, err = _run_driver(tmp_path, ENGINES["fsdp2"], cfg)
    assert f"resumed from {ckpt} (step 1)" in err
    assert [info["engine"] for info in ranks] == ["fsdp2", "fsdp2"]
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[:2] == rows_before[:2]  # kept; step 2 and on trained again by two processes

    # both processes started from the checkpoint: its adapter, its optimiser state
    saved = load_trainer_state(ckpt)["optimizer"]["state"]
    at_ckpt = build_policy(TrainConfig.from_flat(**shape, out=str(tmp_path / "x"), steps=5))
    at_ckpt.load_trainable(ckpt)
    for r in (0, 1):
        restored = torch.load(tmp_path / f"restored{r}.pt", weights_only=True)
        assert _max_diff(restored["weights"], _trainable(at_ckpt)) == 0
        assert restored["optimizer"]["state"].keys() == saved.keys()
        for name, entry in saved.items():
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(restored["optimizer"]["state"][name][k], entry[k]), (name, k)
    w0, w1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert _max_diff(w0, _trainable(at_ckpt)) > 1e-4  # and trained on from there
