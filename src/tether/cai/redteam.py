"""Red-team prompts (harmful requests) and harmless prompts for the helpfulness check.

`default`: tether's own harmful requests (redteam.jsonl, written for tether) plus the prompts of
the `jailbreak-corpus-mini-py` wheel (prompt-injection and role-hijack requests); `jsonl:PATH`:
one {"prompt": ...} object a line. Held-out prompts, chosen by a hash of the text, are never
revised, trained or labelled on: they are what the evaluation asks.
"""

from __future__ import annotations

import json
from importlib import resources

from tether.data import read_jsonl_prompts, text_bucket
from tether.errors import TetherError


def _own(kind: str) -> list[str]:
    text = resources.files("tether.cai").joinpath("redteam.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["kind"] == kind]


def jailbreak_corpus_prompts() -> list[str]:
    """The 15 prompts of jailbreak-corpus-mini's corpus.json (read directly: the data is the
    point, its helper API is not)."""
    try:
        files = resources.files("jailbreak_corpus_mini")
    except ModuleNotFoundError:
        raise TetherError(
            "red-team prompts 'default' need jailbreak-corpus-mini: "
            "pip install jailbreak-corpus-mini-py==0.1.0"
        ) from None
    return [row["prompt"] for row in json.loads(files.joinpath("corpus.json").read_text())]


def load_redteam(spec: str = "default") -> list[str]:
    """Harmful prompts of a red-team spec, de-duplicated, in a fixed order."""
    if spec == "default":
        prompts = _own("harmful") + jailbreak_corpus_prompts()
    elif spec.startswith("jsonl:") and spec[6:]:
        prompts = [r.prompt for r in read_jsonl_prompts(spec[6:])]
    else:
        raise TetherError(f"unknown red-team spec {spec!r}; expected default or jsonl:PATH")
    return list(dict.fromkeys(prompts))


def harmless_prompts() -> list[str]:
    """tether's own harmless requests: a constitution must not buy harmlessness by refusing
    everything, and these show whether it did."""
    return _own("harmless")


def split_prompts(prompts: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each prompt's text."""
    heldout = [p for p in prompts if text_bucket(p) < heldout_fraction]
    train = [p for p in prompts if text_bucket(p) >= heldout_fraction]
    if not train or not heldout:
        raise TetherError(
            f"{len(prompts)} red-team prompts give {len(train)} to train on and {len(heldout)} "
            f"held out at --heldout-fraction {heldout_fraction}: both must be non-empty"
        )
    return train, heldout
