"""The constitution: written principles, each a critique request, a revision request and the
multiple-choice question the feedback model answers. tether ships its own (constitution.yaml,
16 principles on harm, toxicity, dishonesty and dangerous help); `--constitution FILE` replaces it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from tether.errors import TetherError

FIELDS = ("critique", "revision", "preference")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # asked about the model's own last answer
    revision: str  # asks for a rewrite in the light of the critique
    preference: str  # "which answer ...?", the feedback model's question


def default_constitution_text() -> str:
    return resources.files("tether.cai").joinpath("constitution.yaml").read_text(encoding="utf-8")


def load_constitution(path: str | None = None) -> list[Principle]:
    """Principles from a YAML file (`principles:` a list of name/critique/revision/preference),
    or tether's own when `path` is None. Errors name the file and the entry."""
    where = path or "tether's default constitution"
    if path is None:
        text = default_constitution_text()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TetherError(f"constitution file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise TetherError(f"cannot read constitution {path}: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TetherError(f"{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    entries = raw.get("principles") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TetherError(f"{where}: expected a non-empty list under the key 'principles'")
    principles = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise TetherError(f"{where}: principle {i} is not a mapping")
        missing = [f for f in FIELDS if not isinstance(entry.get(f), str) or not entry[f].strip()]
        if missing:
            raise TetherError(
                f"{where}: principle {i} ({entry.get('name', 'unnamed')}) lacks {', '.join(missing)}"
            )
        name = str(entry.get("name") or f"principle-{i}")
        principles.append(Principle(name, *(entry[f].strip() for f in FIELDS)))
    return principles


def sample_principle(principles: list[Principle], rng: random.Random) -> Principle:
    """One principle, uniformly: the paper samples a principle per critique/label, so no single
    wording dominates the data."""
    return principles[rng.randrange(len(principles))]
