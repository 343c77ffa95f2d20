"""Rewards: anything with `score(prompts, completions) -> list[float]`.

Specs (the `--reward` and `--judge` options):
    profanity[@prob|@logit]               1 - P(offensive) (or -logit P) by alt-profanity-check
    hatesonar                             1 - P(hate or offensive) by HateSonar (the gold judge)
    hf:ID_OR_PATH[:LABEL][@prob|@logit]   P(LABEL) (or its logit) by any Hugging Face sequence
                                          classifier, the label named as in its id2label
    python:package.module:function        a callable importable from the environment
    python:path/to/file.py:function       a callable defined in a file (this runs that file:
                                          a python: spec is code execution by design)
    pm:DIR                                a preference model trained by `tether train-rm`: its
                                          scalar score of prompt + completion
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from tether.errors import TetherError, user_frames


@runtime_checkable
class RewardModel(Protocol):
    """Scores completions; higher is better. One float per (prompt, completion) pair."""

    name: str

    def score(self, prompts: list[str], completions: list[str]) -> list[float]: ...


def load_reward(
    spec: str,
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_bin_weights: bool = False,
) -> RewardModel:
    """Parse a reward spec into a RewardModel; unknown kinds name the ones that exist.

    `device` (cpu, cuda, cuda:N, auto) is where a neural classifier runs: the policy's device.
    `trust_remote_code` / `allow_bin_weights`: as for the policy (models.load_model); off, an
    hf: classifier loads from safetensors and runs no code shipped with it.
    """
    kind, _, rest = spec.partition(":")
    if kind == "python" and rest:
        from tether.rewards.python import PythonReward

        return PythonReward.from_spec(rest)
    if kind == "hf" and rest:
        from tether.rewards.hf import HFClassifierReward, parse_hf_spec

        model, label, mode = parse_hf_spec(rest)
        return HFClassifierReward(
            model,
            label,
            mode,
            device=device,
            trust_remote_code=trust_remote_code,
            allow_bin_weights=allow_bin_weights,
        )
    if kind == "pm" and rest:
        from tether.rewards.pm import PreferenceModelReward

        return PreferenceModelReward(rest, device=device)
    name, _, mode = spec.partition("@")
    if name == "profanity" and not rest:
        from tether.rewards.profanity import ProfanityReward

        return ProfanityReward(mode or "prob")
    if spec == "hatesonar":
        from tether.rewards.hatesonar import HateSonarJudge

        return HateSonarJudge()
    raise TetherError(
        f"unknown reward spec {spec!r}; expected profanity[@prob|@logit], hatesonar, "
        "hf:ID_OR_PATH[:LABEL][@prob|@logit], pm:DIR, python:module:function or "
        "python:path/file.py:function"
    )


def checked_scores(reward: RewardModel, prompts: list[str], completions: list[str]) -> list[float]:
    """Call the reward and insist on one finite number per completion.

    A reward that raises, returns the wrong length, or returns NaN/inf/non-numbers is a user
    error: training on it would silently corrupt the policy.
    """
    try:
        scores = reward.score(prompts, completions)
    except TetherError:
        raise
    except Exception as e:  # the user's code: one line that says where it broke (--debug: all)
        where = user_frames(e)
        raise TetherError(
            f"reward {reward.name} raised {type(e).__name__}: {e}"
            + (f" ({where})" if where else "")
        ) from e
    try:
        scores = list(scores)
    except TypeError:
        raise TetherError(
            f"reward {reward.name} returned {type(scores).__name__}, expected a list of floats"
        ) from None
    if len(scores) != len(completions):
        raise TetherError(
            f"reward {reward.name} returned {len(scores)} scores for {len(completions)} completions"
        )
    out = []
    for i, s in enumerate(scores):
        try:
            f = float(s)
        except (TypeError, ValueError):
            raise TetherError(
                f"reward {reward.name} returned a non-numeric score {s!r} at index {i}"
            ) from None
        if not math.isfinite(f):
            raise TetherError(
                f"reward {reward.name} returned {f} at index {i} for completion {completions[i][:60]!r}"
            )
        out.append(f)
    return out
