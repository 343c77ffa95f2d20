"""Prompt sources. Specs (the `--prompts` option):

jsonl:PATH                       one JSON object a line with a "prompt" string and optionally
                                 "reference"
chitchat, chitchat:toxic         chit-chat dialogues to summarise (see chitchat.py);
chitchat:rest                    those the toxic pool leaves out
dialogsum[:PATH][@MIN-MAX]       DialogSum dialogues with reference summaries (see dialogsum.py)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.errors import TetherError


@dataclass(frozen=True)
class PromptRecord:
    """A prompt; optionally a reference answer, and the source text the answer is about (the
    dialogue a summary should stay close to; the prompt itself when None)."""

    prompt: str
    reference: str | None = None
    source: str | None = None


SPLITS = ("all", "train", "heldout")
# The walkthrough's instruction around a dialogue, for every summarisation source.
SUMMARIZE_TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"


def load_prompts(
    spec: str, split: str = "all", heldout_fraction: float = 0.2
) -> list[PromptRecord]:
    """Parse a prompt spec into records of one split; never returns an empty list."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, rest = spec.partition(":")
    if kind == "jsonl" and rest:
        records = read_jsonl_prompts(rest)
        if not records:
            raise TetherError(f"prompt source {spec} holds no prompts")
        if split != "all":
            heldout = split == "heldout"
            records = [r for r in records if (text_bucket(r.prompt) < heldout_fraction) == heldout]
    elif kind == "chitchat" and rest in ("", "all", "toxic", "rest"):
        from tether.data.chitchat import load_chitchat

        records = load_chitchat(split=split, heldout_fraction=heldout_fraction, pool=rest or "all")
    elif spec.startswith("dialogsum") and spec[len("dialogsum") :][:1] in ("", ":", "@"):
        from tether.data.dialogsum import load_dialogsum, parse_dialogsum_spec

        path, chars = parse_dialogsum_spec(spec[len("dialogsum") :])
        records = load_dialogsum(path, split, heldout_fraction, chars)
    else:
        raise TetherError(
            f"unknown prompt spec {spec!r}; expected jsonl:PATH, chitchat, chitchat:toxic, "
            "chitchat:rest or dialogsum[:PATH][@MIN-MAX]"
        )
    if not records:
        raise TetherError(
            f"prompt source {spec} holds no {split} prompts ({heldout_fraction:.0%} are held out)"
        )
    return records


def text_bucket(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (not Python's per-process salted hash)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def jsonl_objects(path: str | Path, what: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON value) for every non-blank line of a JSONL file; every error
    names the file (`what` says which kind) and the line."""
    p = Path(path)
    if not p.is_file():
        raise TetherError(f"{what} not found: {path}")
    try:
        raw_lines = p.read_bytes().splitlines()
    except OSError as e:
        raise TetherError(f"cannot read {what} {path}: {e.strerror}") from None
    rows = []
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
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TetherError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def read_jsonl_prompts(path: str) -> list[PromptRecord]:
    """Read prompts from JSONL; every error names the file and the line."""
    records = []
    for lineno, row in jsonl_objects(path, "prompt file"):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise TetherError(f'{path}:{lineno}: expected an object with a string "prompt" field')
        if not row["prompt"].strip():
            raise TetherError(f"{path}:{lineno}: empty prompt")
        ref = row.get("reference")
        records.append(PromptRecord(row["prompt"], ref if isinstance(ref, str) else None))
    return records
