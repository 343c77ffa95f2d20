"""`--report-to`: TensorBoard for real (the event files hold the metrics), a missing tracker
package fails in one line, and metrics.jsonl is written either way."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tether.tracking
from tether.cli import main
from tether.rundir import RunDir
from tether.tracking import tracker_values


@pytest.fixture
def train_args(train_args):
    """conftest's command line (the later option wins): 3 steps of 4, guard probes off."""
    more = ("--steps", "3", "--batch-size", "4", "--max-new-tokens", "6", "--judge-every", "0")
    return [*train_args, *more]


def test_tensorboard_event_files_hold_the_metrics(train_args, tmp_path):
    assert main([*train_args, "--report-to", "tensorboard"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard" / "tether"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"env/reward_mean", "objective/kl", "objective/kl_coef", "loss/policy"} <= tags
    assert "train/response_len_mean" in tags and "step" not in tags
    for tag, key in (("env/reward_mean", "reward_mean"), ("objective/kl", "kl_mean")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in rows]


def test_resumed_run_logs_each_step_once_in_tensorboard(train_args, tmp_path, monkeypatch):
    """A run stopped after logging steps 0-3 with its last checkpoint at step 1 resumes at 2 and
    logs 2 and 3 again: TensorBoard must show every step once, with the resumed run's values."""
    argv = [*train_args, "--steps", "6", "--save-every", "2", "--report-to", "tensorboard"]
    save = RunDir.save_checkpoint

    def crash_at_step_3(self, step, *args, **kw):
        if step == 3:
            raise KeyboardInterrupt  # after steps 0-3 were logged; step-1 is the last checkpoint
        return save(self, step, *args, **kw)

    monkeypatch.setattr(RunDir, "save_checkpoint", crash_at_step_3)
    assert main(argv) == 130  # Ctrl-C's exit code
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    assert main([*argv, "--resume"]) == 0
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    events = EventAccumulator(str(run / "tensorboard" / "tether"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("env/reward_mean")]
    assert logged == [(r["step"], pytest.approx(r["reward_mean"], rel=1e-6)) for r in rows]


def test_missing_tracker_package_is_one_line(train_args, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tether.tracking, "get_available_trackers", lambda: [])
    assert main([*train_args, "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --report-to wandb: the wandb package is not installed (pip install wandb)"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_tracker_values_namespace_numbers_only():
    row = {"step": 3, "reward_mean": 0.5, "kl_mean": 1, "guard": {"flags": []}, "early": True}
    assert tracker_values(row) == {"env/reward_mean": 0.5, "objective/kl": 1.0}
