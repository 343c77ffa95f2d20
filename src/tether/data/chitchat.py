"""Chit-chat dialogues to summarise: the embedded default prompt set.

Source: the PyPI package `chitchat-dataset` (MIT), 7,168 real human chat conversations from the
Chit Chat Challenge, shipped as one `dataset.json`. We read that file directly: the package's own
classes load it the same way, but going through the file keeps us independent of their API and
of anything that might fetch data.

File structure: `{conversation_id: {"messages": [[utterance, ...], ...], "prompt": str,
"start": str, "ratings": {...}}}`, where each inner list is one *turn*: consecutive utterances
(`{"text", "timestamp", "sender"}`) by the same sender; consecutive turns alternate senders.
44% of the conversations have a single sender and a single turn ("hi there", "are you there?"):
nobody answered. They are not dialogues and are dropped (`min_turns`). A handful of the others
open identically ("hello?" / "hi!"); after the cut those are deduplicated.

Each dialogue is rendered DialogSum-style, one line per turn, speakers renamed by order of
appearance ("#Person1#: ...", "#Person2#: ..."), and cut at a turn boundary to `max_chars`: whole
turns only, so the policy never summarises half a sentence.

The split is a stable hash of the conversation id: a conversation lands in the same split
whatever `max_chars`, pool or Python process (Python's `hash()` is salted per process). Records
come back ordered by that hash too, so the first N of a split are a random sample of it rather
than the earliest chats of the collection.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from tether.data import SUMMARIZE_TEMPLATE, PromptRecord
from tether.errors import TetherError

CHITCHAT_TEMPLATE = SUMMARIZE_TEMPLATE
SPEAKERS = ("#Person1#", "#Person2#")
SPLITS = ("train", "heldout", "all")
POOLS = ("all", "toxic", "rest")  # rest: every dialogue the toxic pool leaves out
# The 1,000 most offensive dialogues of <= 700 characters: the detox recipe's prompt set. Of the
# 3,963 dialogues that remain at 700 characters that is the top quarter: scores >= 0.094, where
# the median dialogue scores 0.037 (alt-profanity-check 1.9.1); 268 of them fall in a 25%
# held-out split, enough for the >= 200 evaluation prompts. The collection is tame: even near
# the top, most of the pool is mild ("sick", "poop", "freaking", shouting) rather than abusive.
DEFAULT_TOXIC_TOP = 1000
INSTALL_HINT = "pip install chitchat-dataset==0.9.0"

Scorer = Callable[[list[str]], Sequence[float]]


def dataset_path() -> Path:
    """Where the installed `chitchat-dataset` keeps `dataset.json` (found without importing it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise TetherError(
            f"the chit-chat prompts need the chitchat-dataset package; {INSTALL_HINT}"
        )
    path = Path(spec.submodule_search_locations[0]) / "dataset.json"
    if not path.is_file():
        raise TetherError(f"chitchat-dataset is installed but {path} is missing; {INSTALL_HINT}")
    return path


def split_bucket(conversation_id: str) -> float:
    """A number in [0, 1) fixed by the id alone: below `heldout_fraction` means held out."""
    digest = hashlib.sha256(f"chitchat:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def render_dialogue(messages: list[list[dict]], max_chars: int) -> tuple[str, int]:
    """Render turns as "#PersonN#: text" lines, keeping as many whole turns as fit in max_chars.

    Returns (dialogue, number of turns kept). Utterances of a turn are joined with a space, as
    the package's own loaders do; empty utterances are skipped, and a turn left empty vanishes
    (the speaker's next turn then merges into their previous one, so speakers still alternate).
    """
    speaker_of: dict[str, str] = {}
    turns: list[list[str]] = []  # [speaker, text]
    for message in messages:
        text = " ".join(" ".join(str(u.get("text", "")) for u in message).split())
        if not text:
            continue
        sender = str(message[0].get("sender"))
        if sender not in speaker_of:
            speaker_of[sender] = SPEAKERS[min(len(speaker_of), len(SPEAKERS) - 1)]
        speaker = speaker_of[sender]
        if turns and turns[-1][0] == speaker:
            turns[-1][1] += " " + text
        else:
            turns.append([speaker, text])
    lines: list[str] = []
    size = -1  # the first line brings no newline
    for speaker, text in turns:
        line = f"{speaker}: {text}"
        if size + 1 + len(line) > max_chars:
            break
        lines.append(line)
        size += 1 + len(line)
    return "\n".join(lines), len(lines)


@lru_cache(maxsize=8)
def _dialogues(max_chars: int, min_turns: int) -> tuple[tuple[str, str], ...]:
    path = dataset_path()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TetherError(f"cannot read {path}: {e}") from None
    out = []
    for cid, conversation in raw.items():
        dialogue, kept = render_dialogue(conversation.get("messages", []), max_chars)
        if kept >= min_turns:
            out.append((cid, dialogue))
    out.sort(key=lambda item: (split_bucket(item[0]), item[0]))
    # A few short openings ("hello?" / "hi!") occur verbatim in several conversations; one copy
    # each, or the same prompt could sit in train and held-out at once.
    seen: set[str] = set()
    unique = []
    for cid, dialogue in out:
        if dialogue not in seen:
            seen.add(dialogue)
            unique.append((cid, dialogue))
    return tuple(unique)


def load_chitchat_dialogues(max_chars: int = 700, min_turns: int = 2) -> list[tuple[str, str]]:
    """(conversation id, rendered dialogue) for every conversation that keeps >= min_turns turns.

    Ordered by the split hash; a dialogue text that several conversations share appears once.
    Cached per (max_chars, min_turns): parsing the 40 MB file takes about a second.
    """
    if max_chars < 1:
        raise TetherError(f"chitchat max_chars must be >= 1, got {max_chars}")
    if min_turns < 1:
        raise TetherError(f"chitchat min_turns must be >= 1, got {min_turns}")
    return list(_dialogues(int(max_chars), int(min_turns)))


def default_scorer() -> Scorer:
    """alt-profanity-check's P(offensive): thousands of texts a second, so scoring the whole
    collection for the toxic pool costs about a second."""
    from tether.rewards.profanity import ProfanityReward

    return ProfanityReward().offensive_prob


def score_dialogues(dialogues: list[str], scorer: Scorer | None = None) -> list[float]:
    """Offensive score per dialogue; a scorer that returns junk is reported, not trusted."""
    scorer = scorer or default_scorer()
    try:
        scores = [float(s) for s in scorer(dialogues)]
    except (TypeError, ValueError) as e:
        raise TetherError(f"chitchat scorer returned non-numbers: {e}") from None
    if len(scores) != len(dialogues):
        raise TetherError(
            f"chitchat scorer returned {len(scores)} scores for {len(dialogues)} dialogues"
        )
    bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
    if bad is not None:
        raise TetherError(f"chitchat scorer returned {scores[bad]} for dialogue {bad}")
    return scores


def load_chitchat(
    max_chars: int = 700,
    split: str = "train",
    heldout_fraction: float = 0.2,
    pool: str = "all",
    toxic_top: int | None = DEFAULT_TOXIC_TOP,
    toxic_min_score: float | None = None,
    scorer: Scorer | None = None,
    min_turns: int = 2,
    template: str = CHITCHAT_TEMPLATE,
) -> list[PromptRecord]:
    """Chit-chat summarisation prompts (no references: the dataset has no summaries).

    pool="toxic" keeps the dialogues whose own text scores highest on `scorer` (a callable
    texts -> P(offensive); default alt-profanity-check): those scoring >= `toxic_min_score` if
    given, then the `toxic_top` highest if given. pool="rest" keeps every other dialogue: the
    ones the toxic pool did not choose, for a second held-out evaluation. The pool is chosen over the whole collection
    *before* splitting, so train and held-out prompts come from the same distribution (each holds
    about its fraction of the pool); ties break by conversation id, so the pool is deterministic.
    """
    if split not in SPLITS:
        raise TetherError(f"chitchat split {split!r} unknown; expected one of {SPLITS}")
    if pool not in POOLS:
        raise TetherError(f"chitchat pool {pool!r} unknown; expected one of {POOLS}")
    if not 0.0 < heldout_fraction < 1.0:
        raise TetherError(f"chitchat heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if "{dialogue}" not in template:
        raise TetherError("chitchat template must contain {dialogue}")
    items = load_chitchat_dialogues(max_chars, min_turns)
    if pool in ("toxic", "rest"):
        if toxic_top is None and toxic_min_score is None:
            raise TetherError("chitchat pool 'toxic' needs toxic_top or toxic_min_score")
        if toxic_top is not None and toxic_top < 1:
            raise TetherError(f"chitchat toxic_top must be >= 1, got {toxic_top}")
        scores = score_dialogues([d for _, d in items], scorer)
        ranked = sorted(zip(scores, items, strict=True), key=lambda x: (-x[0], x[1][0]))
        if toxic_min_score is not None:
            ranked = [r for r in ranked if r[0] >= toxic_min_score]
        if toxic_top is not None:
            ranked = ranked[:toxic_top]
        toxic = {cid for _, (cid, _) in ranked}
        items = [item for item in items if (item[0] in toxic) == (pool == "toxic")]
    if split != "all":
        heldout = split == "heldout"
        items = [it for it in items if (split_bucket(it[0]) < heldout_fraction) == heldout]
    if not items:
        raise TetherError(
            f"chitchat selection is empty (max_chars={max_chars}, split={split}, pool={pool})"
        )
    return [
        PromptRecord(template.replace("{dialogue}", dialogue), source=dialogue)
        for _, dialogue in items
    ]
