"""DialogSum-style prompts: dialogues to summarise, each with a human reference summary.

Specs (the `--prompts` option):

    dialogsum                    the hub dataset knkarthick/dialogsum (train split), through the
                                 `datasets` package; needs the network the first time
    dialogsum:PATH               a local copy: a CSV or JSONL file with `dialogue` and `summary`
                                 columns, or a directory of them: the .csv / .jsonl files with
                                 `train` in their name (the hub's train.csv, the original
                                 release's dialogsum.train.jsonl), else all of them
    ...@MIN-MAX                  keep dialogues with MIN < characters <= MAX, the walkthrough's
                                 filter being `dialogsum@200-1000`

The split is a stable hash of the dialogue text (a dialogue that occurs twice is kept once, so it
can never sit in both splits), and records come back in hash order: the first N of a split are a
random sample of it. The walkthrough split DialogSum's train split 80/20 at random; this is the
same idea, reproducible across processes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from tether.data import SUMMARIZE_TEMPLATE, PromptRecord, jsonl_objects, text_bucket
from tether.errors import TetherError

HUB_ID = "knkarthick/dialogsum"
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_EXTENSIONS = (".csv", ".jsonl")


def parse_dialogsum_spec(rest: str) -> tuple[str | None, tuple[int, int] | None]:
    """What follows `dialogsum` (`''`, `:PATH`, `@MIN-MAX`, `:PATH@MIN-MAX`) -> (path, range)."""
    chars = None
    head, sep, tail = rest.rpartition("@")
    if sep and (m := _RANGE.match(tail)):
        rest, chars = head, (int(m.group(1)), int(m.group(2)))
        if chars[0] >= chars[1]:
            raise TetherError(f"dialogsum length filter @{tail}: MIN must be below MAX")
    if (rest and not rest.startswith(":")) or rest == ":":
        raise TetherError(
            f"unknown prompt spec 'dialogsum{rest}'; expected dialogsum[:PATH][@MIN-MAX], "
            "e.g. dialogsum:data/dialogsum@200-1000"
        )
    return (rest[1:] or None), chars


def load_dialogsum(
    path: str | None = None,
    split: str = "all",
    heldout_fraction: float = 0.2,
    chars: tuple[int, int] | None = None,
    template: str = SUMMARIZE_TEMPLATE,
) -> list[PromptRecord]:
    """Summarisation prompts with their reference summaries, from `path` or the hub."""
    rows = _hub_rows() if path is None else _local_rows(Path(path))
    where = path or HUB_ID
    seen: set[str] = set()
    items = []
    for dialogue, summary in rows:
        dialogue = dialogue.strip()
        if not dialogue or dialogue in seen:
            continue
        if chars is not None and not chars[0] < len(dialogue) <= chars[1]:
            continue
        seen.add(dialogue)
        items.append((text_bucket(dialogue), dialogue, summary.strip() or None))
    if split != "all":
        heldout = split == "heldout"
        items = [it for it in items if (it[0] < heldout_fraction) == heldout]
    items.sort()
    if not items:
        limit = f" of {chars[0]} < characters <= {chars[1]}" if chars else ""
        raise TetherError(f"dialogsum {where} holds no {split} dialogues{limit}")
    return [
        PromptRecord(template.replace("{dialogue}", d), reference=s, source=d) for _, d, s in items
    ]


def _hub_rows() -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise TetherError(
            f"prompts 'dialogsum' read {HUB_ID} from the hub through the datasets package "
            "(pip install datasets), or pass a local copy as dialogsum:PATH"
        ) from None
    try:
        data = datasets.load_dataset(HUB_ID, split="train")
    except Exception as e:  # offline, hub errors: all end in the same advice
        raise TetherError(
            f"cannot fetch {HUB_ID} from the Hugging Face hub ({type(e).__name__}; offline?): "
            f"download it where there is network (`hf download {HUB_ID} --repo-type dataset "
            "--local-dir DIR`) and pass dialogsum:DIR"
        ) from None
    return [(str(r["dialogue"] or ""), str(r["summary"] or "")) for r in data]


def _local_rows(path: Path) -> list[tuple[str, str]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _EXTENSIONS)
        files = [p for p in files if "train" in p.name] or files
        if not files:
            raise TetherError(f"dialogsum directory {path} holds no .csv or .jsonl file")
    elif path.is_file():
        files = [path]
    else:
        raise TetherError(f"dialogsum path not found: {path}")
    return [row for f in files for row in _read_file(f)]


def _read_file(path: Path) -> list[tuple[str, str]]:
    """(dialogue, summary) rows; errors name the file (and the line, for JSONL)."""
    if path.suffix == ".jsonl":
        rows = []
        for lineno, row in jsonl_objects(path, "dialogsum file"):
            if not isinstance(row, dict) or not isinstance(row.get("dialogue"), str):
                raise TetherError(f'{path}:{lineno}: expected an object with a string "dialogue"')
            rows.append((row["dialogue"], str(row.get("summary") or "")))
        return rows
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TetherError(f"cannot read dialogsum file {path}: {e}") from None
    reader = csv.DictReader(text.splitlines(keepends=True))
    if "dialogue" not in (reader.fieldnames or []):
        raise TetherError(
            f"{path}: no 'dialogue' column (columns: {', '.join(reader.fieldnames or [])})"
        )
    return [(r["dialogue"] or "", r.get("summary") or "") for r in reader]
