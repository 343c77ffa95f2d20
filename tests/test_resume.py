"""Crash-safe resume and the run directory's write guarantees: a real `kill -9` then `--resume`
ends where an uninterrupted run ends; unfinished checkpoints are never picked; --force; a full
disk or a read-only directory is one line naming the path and keeps the last checkpoint."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close_nested
from conftest import resume_argv as _argv

import tether
from tether.cli import main
from tether.config import TrainConfig
from tether.errors import TetherError
from tether.options import field_type, options
from tether.rundir import COMPLETE, RunDir, checkpoint_problem, load_trainer_state
from tether.trainer import build_policy, train

SRC = str(Path(tether.__file__).resolve().parents[1])  # this checkout's src/, for subprocesses


def _cfg(argv) -> TrainConfig:
    pairs = dict(zip(argv[::2], argv[1::2], strict=True))
    types = {o.name: field_type(o)[0] for o in options(TrainConfig)}
    kw = {}
    for flag, value in pairs.items():
        name = flag[2:].replace("-", "_")
        kw[name] = types[name](value)
    return TrainConfig.from_flat(**kw, progress=False)


def _cli(argv, **kw):
    # one intra-op thread: on 2 busy cores torch's 2-thread pool made a tiny step ~50x slower
    # (5 s vs 0.1 s, measured); the in-process comparison runs use one thread too
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "train", *argv, "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _n_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def test_kill_9_then_resume_matches_uninterrupted_run(
    tiny_llama, prompts_file, reward_file, tmp_path
):
    """A real SIGKILL at a random moment after the first checkpoint (mid-step, mid-probe or
    mid-checkpoint), then `--resume`: same metrics rows (every step once), same adapter."""
    steps = 12
    killed_dir = tmp_path / "killed"
    argv = _argv(tiny_llama, prompts_file, reward_file, killed_dir, steps)
    proc = _cli(argv)
    first = killed_dir / "checkpoints" / "step-1" / COMPLETE
    rng = random.Random()
    target = rng.randint(2, steps - 4)  # kill during the step after this many rows
    deadline = time.monotonic() + 240
    while not (first.exists() and _n_rows(killed_dir) >= target):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress within 240 s"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.1))  # anywhere in a step, a probe or a checkpoint save
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    killed_rows = len((killed_dir / "metrics.jsonl").read_text().splitlines())
    assert killed_rows < steps

    resumed = _cli([*argv, "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err

    assert not list(killed_dir.rglob(".*.tmp-*")), "temp dirs of the killed run remain"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: the same float reduction order
    try:
        full = train(_cfg(_argv(tiny_llama, prompts_file, reward_file, tmp_path / "full", steps)))
    finally:
        torch.set_num_threads(threads)
    got, want = _rows(killed_dir), _rows(tmp_path / "full")
    assert [r["step"] for r in got] == list(range(steps))  # none twice, none missing
    for a, b in zip(want, got, strict=True):
        assert_close_nested(a, b, rel=1e-5, abs=1e-6)
    policy = build_policy(_cfg(argv))
    policy.load_trainable(killed_dir / "final")
    for a, b in zip(full.policy.trainable_parameters(), policy.trainable_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert json.loads((killed_dir / "guard.json").read_text())["best"] == full.guard["best"]


def _fake_checkpoint(run: RunDir, step: int) -> Path:
    return run.save_checkpoint(step, lambda d: (d / "w.bin").write_bytes(b"x" * 10), {}, "a: 1\n")


def test_unfinished_checkpoints_are_never_picked(tmp_path, capsys):
    run = RunDir(tmp_path)
    good = _fake_checkpoint(run, 2)
    assert run.latest_checkpoint() == good and checkpoint_problem(good) is None
    ckpts = tmp_path / "checkpoints"
    # a leftover temp dir of a killed save, and a newer step-N without its marker
    (ckpts / ".step-9.tmp-123").mkdir()
    (ckpts / ".step-9.tmp-123" / "trainer_state.pt").write_bytes(b"")
    no_marker = _fake_checkpoint(run, 5)
    (no_marker / COMPLETE).unlink()
    # a newer one whose file lost bytes after the marker was written
    torn = _fake_checkpoint(run, 7)
    (torn / "w.bin").write_bytes(b"x" * 3)
    assert run.latest_checkpoint() == good
    err = capsys.readouterr().err
    assert "step-7: w.bin has 3 bytes" in err and "step-5: no tether-complete.json" in err
    assert load_trainer_state(good)["step"] == 2


def test_resume_with_a_different_config_needs_force(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", *_argv(tiny_llama, prompts_file, reward_file, out, 2), "--no-progress"]
    argv += ["--judge-every", "0"]
    assert main(argv) == 0
    capsys.readouterr()
    changed = [*argv, "--resume", "--lr", "0.02"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr 0.01 -> 0.02" in err[0] and "--force" in err[0], err
    assert main([*changed, "--force", "--steps", "3"]) == 0
    assert "lr: 0.02" in (out / "config.yaml").read_text()
    assert [r["step"] for r in _rows(out)] == [0, 1, 2]


def _enospc_on_save(monkeypatch, after: int):
    """torch.save in the run directory fails like a full disk (the message torch really gives,
    measured on a full tmpfs) from the `after`+1-th call on."""
    import tether.rundir

    real, calls = tether.rundir.torch.save, []

    def save(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) > after:
            Path(path).write_bytes(b"half")  # a torn file is left behind, as on a real disk
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            )
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(tether.rundir.torch, "save", save)


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = ["train", *_argv(tiny_llama, prompts_file, reward_file, out, 6), "--no-progress"]
    argv += ["--judge-every", "0"]
    _enospc_on_save(monkeypatch, after=1)  # step-1 is written, step-3 hits the full disk
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write "), err
    assert str(out / "checkpoints" / "step-3") in err[0] and "bytes free" in err[0]
    assert "Traceback" not in err[0]
    assert not (out / "final").exists()  # not presented as a finished run
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name != "step-1"]
    run = RunDir(out)
    assert run.latest_checkpoint() == out / "checkpoints" / "step-1"
    # ... and it is loadable: resuming (with space again) finishes the run
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0
    assert [r["step"] for r in _rows(out)] == list(range(6))


def test_enospc_from_the_os_names_the_path(tmp_path, monkeypatch):
    """The OSError path (safetensors and plain writes): errno ENOSPC -> one line with the path."""
    run = RunDir(tmp_path)
    _fake_checkpoint(run, 1)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(TetherError, match=r"cannot write .*step-3: No space left on device"):
        run.save_checkpoint(3, full, {}, "a: 1\n")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TetherError, match=r"cannot write .*metrics.jsonl: No space left"):
        run.append_metrics({"step": 2})
    with pytest.raises(TetherError, match=r"cannot write .*config.yaml: No space left"):
        run.prepare("a: 2\n", resume=True, force=True)
    monkeypatch.undo()
    assert run.latest_checkpoint() == tmp_path / "checkpoints" / "step-1"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_read_only_out_dir_is_one_line(tiny_llama, prompts_file, reward_file, tmp_path, capsys):
    """chmod 0o555 for a normal user; root ignores permissions, so as root a read-only tmpfs
    is mounted instead (skipped when neither is possible)."""
    out = tmp_path / "ro"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:
        cmd = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)]
        if subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        mounted = True
    else:
        out.chmod(0o555)
    try:
        argv = ["train", *_argv(tiny_llama, prompts_file, reward_file, out, 1), "--no-progress"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot write "), err
        assert str(out) in err[0], err
        assert "Permission denied" in err[0] or "Read-only file system" in err[0], err
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)
        else:
            out.chmod(0o755)


def test_a_real_full_disk(tiny_llama, prompts_file, reward_file, tmp_path, capsys):
    """On a tiny tmpfs (needs root to mount; else skipped, the monkeypatched tests above run
    everywhere): the disk fills up after the first checkpoint; one line, step-1 intact."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        filler = Path(mnt / "filler")
        fill = tmp_path / "fill.py"
        fill.write_text(
            "import os\n"
            f"FILLER, CKPT = {str(filler)!r}, {str(out / 'checkpoints' / 'step-1')!r}\n"
            "def frac_a(p, c):\n"
            "    if os.path.isdir(CKPT) and not os.path.exists(FILLER):\n"
            "        fd = os.open(FILLER, os.O_WRONLY | os.O_CREAT)\n"
            "        try:\n"
            "            while True:\n"
            "                os.write(fd, b'x' * 4096)\n"
            "        except OSError:\n"
            "            os.close(fd)\n"
            "        os.truncate(FILLER, os.path.getsize(FILLER) - 16384)  # room for metrics\n"
            "    return [x.count('a') / max(len(x), 1) for x in c]\n"
        )
        argv = ["train", *_argv(tiny_llama, prompts_file, fill, out, 6), "--no-progress"]
        argv += ["--judge-every", "0"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot write "), err
        assert str(mnt) in err[0]
        run = RunDir(out)
        assert run.latest_checkpoint() == out / "checkpoints" / "step-1"
        policy = build_policy(_cfg(_argv(tiny_llama, prompts_file, fill, out, 6)))
        policy.load_trainable(out / "checkpoints" / "step-1")
        assert load_trainer_state(out / "checkpoints" / "step-1")["step"] == 1
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_detox_kill_9_then_resume_matches_uninterrupted_run(tiny_llama, scorers_file, tmp_path):
    """`tether detox` killed during PPO, then `--resume`: the baseline is kept, PPO continues
    from the checkpoint, and the aligned evaluation and metrics equal an uninterrupted run's."""
    prompts = tmp_path / "prompts.jsonl"
    words = ["hello there", "how are you", "the cat sat", "a bad day", "rain again", "see you"]
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{w} {i}"}) + "\n" for i in range(6) for w in words)
    )

    def argv(out):
        return [
            "detox",
            *("--policy", str(tiny_llama), "--prompts", f"jsonl:{prompts}"),
            *(
                "--reward",
                f"python:{scorers_file}:vowels",
                "--judge",
                f"python:{scorers_file}:spaces",
            ),
            *("--out", str(out), "--steps", "8", "--save-every", "2", "--judge-every", "4"),
            *("--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "6"),
            *("--eval-prompts", "6", "--eval-batch-size", "6", "--eval-samples", "1"),
            *("--probe-prompts", "2"),
            *("--lora-r", "4", "--no-similarity", "--no-progress"),
        ]

    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tether.cli"]
    proc = subprocess.Popen(
        [*cmd, *argv(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not ((killed / "checkpoints" / "step-1" / COMPLETE).exists() and _n_rows(killed) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no progress within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill"
    baseline = (killed / "eval" / "baseline.jsonl").read_text()
    done = subprocess.run(
        [*cmd, *argv(killed), "--resume"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (killed / "eval" / "baseline.jsonl").read_text() == baseline  # reused, not redone
    full = tmp_path / "full"
    done = subprocess.run([*cmd, *argv(full)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in _rows(killed)] == list(range(8))
    for a, b in zip(_rows(full), _rows(killed), strict=True):
        assert_close_nested(a, b, rel=1e-5, abs=1e-6)
    aligned = [json.loads(x) for x in (killed / "eval" / "aligned.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (full / "eval" / "aligned.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in aligned] == [r["completion"] for r in want]
    from safetensors.torch import load_file

    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (killed, full))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_resume_falls_back_past_a_checkpoint_that_does_not_load(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys
):
    """step-1 (the newest) is complete on disk (marker and sizes agree) but its trainer state is
    garbage: --resume warns, continues from step-0, and the run still ends with every step once."""
    out = tmp_path / "run"
    argv = ["train", *_argv(tiny_llama, prompts_file, reward_file, out, 4), "--no-progress"]
    argv += ["--judge-every", "0", "--save-every", "1", "--steps", "3"]
    assert main(argv) == 0
    state = out / "checkpoints" / "step-1" / "trainer_state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size: the marker cannot tell
    capsys.readouterr()
    assert main([*argv[:-1], "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "cannot load" in err and "step-1" in err and "resumed from" in err
    assert f"{out / 'checkpoints' / 'step-0'} (step 0)" in err
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    """A kill in the middle of appending a row leaves half a line; resume truncation keeps the
    rows up to the checkpoint and drops the torn one."""
    run = RunDir(tmp_path)
    for step in range(3):
        run.append_metrics({"step": step, "reward_mean": 0.5})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 3, "rewa')
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2]
    run.truncate_metrics(1)
    assert run.metrics_path.read_text().splitlines() == [
        json.dumps({"step": s, "reward_mean": 0.5}) for s in (0, 1)
    ]


def test_config_changes_names_options_and_ignores_newer_ones():
    from tether.rundir import config_changes

    old = "lr: 0.001\nsteps: 10\nresume: false\n"
    assert config_changes(old, "lr: 0.001\nsteps: 20\nresume: true\nforce: true\n") == ""
    assert config_changes(old, "lr: 0.002\nsteps: 10\n") == "lr 0.001 -> 0.002"
    # an option tether gained after the old run was written is not a change
    assert config_changes(old, "lr: 0.001\nsteps: 10\nmax_importance_ratio: 10.0\n") == ""
    assert config_changes("{oops", "lr: 1\n") == "the old config.yaml is not valid YAML"


def test_a_full_disk_anywhere_in_the_run_is_one_line(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys, monkeypatch
):
    """Past the run directory's own writers (here: creating guard/ for the probes)."""
    real = Path.mkdir

    def mkdir(self, *a, **kw):
        if self.name == "guard":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "run"
    argv = ["train", *_argv(tiny_llama, prompts_file, reward_file, out, 2), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot write {out / 'guard'}: No space left on device"], err
