"""Example rewards for `--reward python:examples/rewards.py:NAME`.

A python: reward is any function `(prompts, completions) -> list[float]`. Loading one runs this
file: a python: spec is code execution by design, so only point it at code you trust.
"""

import re

POSITIVE = {
    "good",
    "great",
    "happy",
    "kind",
    "lovely",
    "nice",
    "wonderful",
    "warm",
    "bright",
    "calm",
    "friendly",
    "joy",
    "beautiful",
    "gentle",
    "cheerful",
    "delightful",
    "glad",
    "thank",
    "thanks",
}


def positive_words(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of words that are on a small list of positive words. Deliberately easy to hack:
    repeating 'wonderful wonderful' maximises it, which is what a KL leash should prevent."""
    scores = []
    for text in completions:
        words = re.findall(r"[a-z']+", text.lower())
        scores.append(sum(w in POSITIVE for w in words) / max(len(words), 1))
    return scores


def brevity(prompts: list[str], completions: list[str]) -> list[float]:
    """Shorter is better, up to a floor: -(words / 20), capped at 0 for >= 3 words."""
    return [-max(len(c.split()), 3) / 20 for c in completions]
