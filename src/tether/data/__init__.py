"""Prompt sources. Specs (the `--prompts` option):

jsonl:PATH      one JSON object a line with a "prompt" string and optionally "reference"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tether.errors import TetherError


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    reference: str | None = None


def load_prompts(spec: str) -> list[PromptRecord]:
    """Parse a prompt spec into records; never returns an empty list."""
    kind, _, rest = spec.partition(":")
    if kind == "jsonl" and rest:
        records = read_jsonl_prompts(rest)
    else:
        raise TetherError(f"unknown prompt spec {spec!r}; expected jsonl:PATH")
    if not records:
        raise TetherError(f"prompt source {spec} holds no prompts")
    return records


def read_jsonl_prompts(path: str) -> list[PromptRecord]:
    """Read prompts from JSONL; every error names the file and the line."""
    p = Path(path)
    if not p.is_file():
        raise TetherError(f"prompt file not found: {path}")
    records = []
    try:
        raw_lines = p.read_bytes().splitlines()
    except OSError as e:
        raise TetherError(f"cannot read prompt file {path}: {e.strerror}") from None
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TetherError(
                f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line)"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TetherError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise TetherError(f'{path}:{lineno}: expected an object with a string "prompt" field')
        if not row["prompt"].strip():
            raise TetherError(f"{path}:{lineno}: empty prompt")
        ref = row.get("reference")
        records.append(PromptRecord(row["prompt"], ref if isinstance(ref, str) else None))
    return records
