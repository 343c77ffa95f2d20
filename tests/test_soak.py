"""benchmarks/soak.py, shortened: SIGKILLs (one during a checkpoint save) and resumes must end
with a continuous metrics.jsonl and the adapter of an uninterrupted run (about a minute)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def test_soak_kills_and_resumes():
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--steps", "60", "--save-every", "5", "--kills", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "each exactly once: True" in proc.stdout
    assert "max |diff| 0 " in proc.stdout and proc.stdout.rstrip().endswith("PASS")
