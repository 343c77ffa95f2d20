"""The bad-input matrix of issue #8: every user mistake is exit code 2 and one line (or a
documented recovery), never a traceback, never a half-written run dir presented as complete.

Where each case is covered (the message of each is asserted once, where it is listed):

| mistake                                   | message asserted in                                  |
| ----------------------------------------- | ---------------------------------------------------- |
| empty prompt file                         | test_cli.py::test_bad_prompt_files                   |
| malformed JSONL line (names the line)     | test_cli.py::test_malformed_jsonl_names_the_line     |
| missing "prompt" field                    | test_cli.py::test_bad_prompt_files                   |
| non-UTF-8 bytes                           | test_cli.py::test_bad_prompt_files                   |
| prompt longer than the context            | here: truncated, counted, warned (exit 0, recovery)  |
| reward raises / wrong length / NaN / inf  | test_cli.py::test_bad_reward_callables; here: mid-run|
| reward model path does not exist          | test_rewards_hf.py::test_offline_hub_id_fails_...    |
| unknown model type                        | here                                                 |
| model with its own code, no --trust-...   | test_safe_loading.py                                 |
| unknown config key (closest suggested)    | test_cli.py::test_unknown_yaml_key_suggests_closest  |
| batch size not divisible by mini-batch    | test_cli.py::test_batch_not_divisible                |

This file adds what those do not check: that every such mistake is caught before the run
directory exists (nothing half-written is left), one case as a real process (no traceback on
the way out of the interpreter either), and the two cases that are not refusals.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error, with_option

import tether
from tether.cli import main

SRC = str(Path(tether.__file__).resolve().parents[1])


@pytest.fixture
def argv(train_args):
    return [*with_option(train_args, "--steps", "2"), "--judge-every", "0"]


def _unknown_model_type(tmp_path: Path) -> str:
    d = tmp_path / "weird-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    return str(d)


def _prompts(tmp_path: Path, content: bytes) -> str:
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    return f"jsonl:{p}"


def _yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


CASES = {
    "empty prompt file": lambda a, t: with_option(a, "--prompts", _prompts(t, b"")),
    "malformed line": lambda a, t: with_option(
        a, "--prompts", _prompts(t, b'{"prompt": "x"}\n{oops\n')
    ),
    "missing prompt field": lambda a, t: with_option(
        a, "--prompts", _prompts(t, b'{"text": "x"}\n')
    ),
    "non-UTF-8": lambda a, t: with_option(a, "--prompts", _prompts(t, b'{"prompt": "caf\xe9"}\n')),
    "reward model path": lambda a, t: with_option(a, "--reward", "hf:./no/such/classifier"),
    "python reward file": lambda a, t: with_option(a, "--reward", "python:./no/such.py:f"),
    "policy path": lambda a, t: with_option(a, "--policy", "./no/such/model"),
    "unknown model type": lambda a, t: with_option(a, "--policy", _unknown_model_type(t)),
    "unknown config key": lambda a, t: [*a, "--config", _yaml(t, "kl_coeff: 0.1\n")],
    "batch not divisible": lambda a, t: with_option(a, "--batch-size", "3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_input_mistakes_leave_no_run_directory(case, argv, tmp_path, capsys):
    line = one_line_error(CASES[case](argv, tmp_path), capsys)
    assert not (tmp_path / "run").exists(), f"{case}: {line}"


def test_unknown_model_type_names_it(argv, tmp_path, capsys):
    line = one_line_error(CASES["unknown model type"](argv, tmp_path), capsys)
    assert "unknown model type" in line and "no-such-architecture" in line, line


def test_a_real_process_prints_one_line_and_no_traceback(argv, tmp_path):
    bad = with_option(argv, "--prompts", _prompts(tmp_path, b'{"prompt": "ok"}\n\n{"prompt": 1,\n'))
    proc = subprocess.run(
        [sys.executable, "-m", "tether", *bad],
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad.jsonl'}:3: malformed"), err


def test_over_long_prompts_are_truncated_counted_and_warned(argv, tmp_path, capsys):
    """Not a refusal: prompts beyond --max-prompt-tokens lose their start (the end, next to
    the answer, is kept), each step counts them in metrics.jsonl and warns once."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "a story " * 20 + str(i)}) + "\n" for i in "12"))
    code = main([*with_option(argv, "--prompts", f"jsonl:{long}"), "--max-prompt-tokens", "16"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("were cut from the left") == 2  # one warning a step
    assert "2 prompt(s) longer than max_prompt_tokens 16" in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["truncated_prompts"] for r in rows] == [2, 2]


def test_a_reward_failing_mid_run_keeps_the_checkpoint_and_resumes(
    argv, tmp_path, capsys, monkeypatch
):
    """The reward returns NaN at step 3: one line naming it, no final/ (the run is not presented
    as finished), checkpoint step-1 intact; fixed, `--resume` finishes from step 2."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text(
        "import os\n"
        "calls = []\n"
        "def f(p, c):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4 and os.environ.get('FLAKY') == '1':\n"
        "        return [float('nan')] * len(c)\n"
        "    return [x.count('a') / max(len(x), 1) for x in c]\n"
    )
    run = tmp_path / "run"
    args = with_option(with_option(argv, "--reward", f"python:{flaky}:f"), "--steps", "5")
    args += ["--save-every", "2"]
    monkeypatch.setenv("FLAKY", "1")
    line = one_line_error(args, capsys)
    assert f"reward python:{flaky}:f returned nan at index 0" in line
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    monkeypatch.setenv("FLAKY", "0")
    assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and (run / "final").is_dir()
