"""The CLI as a user runs it: a real subprocess for the happy path, and the bad-input matrix
(exit code 2, one line `error: ...`, no traceback) through the same `main`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error, undocumented, with_option

from tether.cli import main

TETHER = str(Path(sys.executable).parent / "tether")


def test_train_end_to_end_subprocess(tiny_llama, prompts_file, reward_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            TETHER,
            "train",
            "--policy",
            str(tiny_llama),
            "--reward",
            f"python:{reward_file}:frac_a",
            "--prompts",
            f"jsonl:{prompts_file}",
            "--out",
            str(out),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--mini-batch-size",
            "2",
            "--max-new-tokens",
            "8",
            "--kl-estimator",
            "k3",
            "--target-kl",
            "1.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "done: 3 steps" in proc.stdout
    assert "ppo" in proc.stderr  # the progress bar
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["kl_estimator"] == "k3" and saved["target_kl"] == 1.0 and saved["steps"] == 3
    assert undocumented(out) == []  # the docs' metrics and run-directory pages list it all


def test_yaml_config_and_command_line_precedence(
    tiny_llama, prompts_file, reward_file, tmp_path, capsys
):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "policy": str(tiny_llama),
                "reward": f"python:{reward_file}:frac_a",
                "prompts": f"jsonl:{prompts_file}",
                "steps": 2,
                "batch-size": 4,
                "mini_batch_size": 2,
                "max_new_tokens": 4,
                "lr": 0.01,
                "progress": False,
            }
        )
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.002"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.002 and saved["batch_size"] == 4 and saved["steps"] == 2


def test_none_turns_off_an_option_that_is_on_by_default():
    from tether.cli import _config, build_parser

    base = ["train", "--policy", "p", "--reward", "r", "--prompts", "q", "--out", "o"]
    parse = build_parser().parse_args
    assert _config(parse(base)).rl.max_importance_ratio == 10.0
    assert _config(parse([*base, "--max-importance-ratio", "none"])).rl.max_importance_ratio is None
    assert _config(parse([*base, "--max-importance-ratio", "4"])).rl.max_importance_ratio == 4.0


def test_missing_prompt_file(train_args, capsys):
    assert "prompt file not found: nope.jsonl" in one_line_error(
        with_option(train_args, "--prompts", "jsonl:nope.jsonl"), capsys
    )


def test_malformed_jsonl_names_the_line(train_args, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert f"{bad}:2: malformed JSON" in one_line_error(
        with_option(train_args, "--prompts", f"jsonl:{bad}"), capsys
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ('{"text": "x"}\n', ':1: expected an object with a string "prompt" field'),
        (b'{"prompt": "caf\xe9"}\n', ":1: not UTF-8 text"),
    ],
)
def test_bad_prompt_files(train_args, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert message in one_line_error(with_option(train_args, "--prompts", f"jsonl:{bad}"), capsys)


def test_unknown_specs(train_args, capsys):
    assert "unknown reward spec 'toxicity'" in one_line_error(
        with_option(train_args, "--reward", "toxicity"), capsys
    )
    assert "unknown prompt spec 'prompts.txt'" in one_line_error(
        with_option(train_args, "--prompts", "prompts.txt"), capsys
    )


@pytest.mark.parametrize(
    "body, message",
    [
        ("    return ['high' for _ in c]", "non-numeric score 'high' at index 0"),
        ("    return [1.0]", "returned 1 scores for "),
        ("    return [float('nan')] * len(c)", "returned nan at index 0"),
        ("    return [float('inf')] * len(c)", "returned inf at index 0"),
        ("    raise KeyError('boom')", "raised KeyError: 'boom'"),
    ],
)
def test_bad_reward_callables(train_args, tmp_path, capsys, body, message):
    path = tmp_path / "bad_reward.py"
    path.write_text(f"def f(p, c):\n{body}\n")
    assert message in one_line_error(
        with_option(train_args, "--reward", f"python:{path}:f"), capsys
    )


def test_a_failing_reward_names_the_users_own_frames(train_args, tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad_reward.py"
    path.write_text(
        "def f(p, c):\n    return [share(x) for x in c]\n\n\ndef share(x):\n    return 1 / 0\n"
    )
    argv = with_option(train_args, "--reward", f"python:{path}:f")
    # without --debug: still one line, but it says where the user's code broke
    msg = one_line_error(argv, capsys)
    assert msg.endswith(
        "raised ZeroDivisionError: division by zero (at bad_reward.py:6 in share: return 1 / 0; "
        "called from bad_reward.py:2 in <listcomp>; called from bad_reward.py:2 in f)"
    ) or msg.endswith(  # Python 3.12+ inlines list comprehensions: no frame of their own
        "raised ZeroDivisionError: division by zero (at bad_reward.py:6 in share: return 1 / 0; "
        "called from bad_reward.py:2 in f)"
    ), msg
    # --debug, anywhere on the line (or TETHER_DEBUG=1): the same line, then the whole traceback
    # with the cause that the one-line error wraps
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("TETHER_DEBUG", env)
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        first, *rest = err.splitlines()
        assert first == msg and "Traceback (most recent call last)" in err
        assert f'File "{path}", line 6, in share' in err and "ZeroDivisionError" in err
        assert "tether.errors.TetherError: reward python:" in rest[-1]


def test_missing_reward_function_and_file(train_args, reward_file, capsys):
    assert "has no callable 'nope'" in one_line_error(
        with_option(train_args, "--reward", f"python:{reward_file}:nope"), capsys
    )
    assert "python reward file not found" in one_line_error(
        with_option(train_args, "--reward", "python:missing.py:f"), capsys
    )


def test_batch_not_divisible(train_args, capsys):
    msg = one_line_error(
        with_option(with_option(train_args, "--batch-size", "16"), "--mini-batch-size", "6"), capsys
    )
    assert "batch_size 16 is not divisible by mini_batch_size 6" in msg


def test_missing_model_path(train_args, capsys):
    assert "model path does not exist: ./no/such/model" in one_line_error(
        with_option(train_args, "--policy", "./no/such/model"), capsys
    )


def test_unknown_yaml_key_suggests_closest(train_args, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert "unknown option 'learning_rate'" in one_line_error(
        train_args + ["--config", str(cfg)], capsys
    )
    cfg.write_text("kl_coeff: 0.1\n")
    assert "(did you mean kl_coef?)" in one_line_error(train_args + ["--config", str(cfg)], capsys)
    cfg.write_text("steps: many\n")
    assert "steps must be int, got 'many'" in one_line_error(
        train_args + ["--config", str(cfg)], capsys
    )


def test_unknown_flag_suggests_closest(train_args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(train_args + ["--kl-coeff", "0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kl-coef" in err[0]


def test_refuses_to_overwrite_a_run(train_args, capsys):
    assert main(train_args) == 0
    capsys.readouterr()
    assert "already holds a run; pass --resume" in one_line_error(train_args, capsys)
    # --resume with changed options is refused, with the same steps it continues
    assert "different config" in one_line_error(
        with_option(train_args, "--max-new-tokens", "5") + ["--resume"], capsys
    )
