"""Offensive-language reward from `alt-profanity-check` (the embedded default proxy reward).

The classifier is a TF-IDF bag of words + a calibrated linear SVM trained on human-labelled
offensive text. It is tiny (about 1 MB), offline, and scores thousands of texts a second, so it
is never the bottleneck of a PPO step. Its weakness is the one every bag-of-words proxy has: it
can be fooled by wording, which is why tether always reports an independent gold judge
(HateSonar) next to it.

Two reward shapes, because the policy lives where the classifier is already almost sure the
text is clean (P(offensive) ~ 0.01-0.1):

    prob    reward = 1 - p                  bounded in [0, 1]; squashed near 1 for clean text
    logit   reward = log((1 - p) / p)       = -logit(p), clipped to [-clip, clip]; spreads the
                                            clean regime out (d reward / d p = 1 / (p (1 - p)),
                                            10-100x steeper at p = 0.1-0.01 than in prob mode)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from tether.errors import TetherError

MODES = ("prob", "logit")

# The model files inside the wheel are pickled with exactly this scikit-learn release, and the
# wheel pins it (scikit-learn==1.9.1, joblib==1.6.0 for alt-profanity-check 1.9.1).
INSTALL_HINT = "pip install alt-profanity-check==1.9.1"


def _load_profanity_model() -> tuple[Any, Any, int]:
    """Return (vectorizer, model, column of the offensive class) from the installed package.

    Importing `profanity_check` unpickles its model (about 1-2 s). A scikit-learn other than the
    one the pickles were written with still loads, but sklearn then warns once per estimator
    (about 14 InconsistentVersionWarnings); we fold those into one warning that says what to pin.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from profanity_check import profanity_check as pc
    except ImportError as e:
        raise TetherError(
            f"reward profanity needs the alt-profanity-check package ({e}); {INSTALL_HINT}"
        ) from None
    mismatch = [w for w in caught if type(w.message).__name__ == "InconsistentVersionWarning"]
    if mismatch:
        import sklearn

        msg = mismatch[0].message
        pickled = getattr(msg, "original_sklearn_version", "?")
        warnings.warn(
            f"alt-profanity-check's model was pickled with scikit-learn {pickled} but "
            f"{sklearn.__version__} is installed; scores may differ: {INSTALL_HINT}",
            stacklevel=3,
        )
    for w in caught:
        if w not in mismatch:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    classes = list(pc.model.classes_)
    if 1 not in classes:
        raise TetherError(f"alt-profanity-check model has unexpected classes {classes}")
    return pc.vectorizer, pc.model, classes.index(1)


class ProfanityReward:
    """Reward = how NON-offensive the completion is, by alt-profanity-check.

    Only the completion is scored: the policy should be rewarded for what it says, and the
    prompt (often an offensive dialogue to summarise) is the same for every sample of it.
    """

    def __init__(self, mode: str = "prob", clip: float = 10.0) -> None:
        if mode not in MODES:
            raise TetherError(f"profanity reward mode {mode!r} unknown; expected one of {MODES}")
        if not clip > 0:
            raise TetherError(f"profanity reward clip must be > 0, got {clip}")
        self.mode = mode
        self.clip = float(clip)
        self.name = "profanity" if mode == "prob" else f"profanity@{mode}"
        self._vectorizer, self._model, self._column = _load_profanity_model()

    def offensive_prob(self, texts: list[str]) -> list[float]:
        """P(offensive) per text, in [0, 1]: the toxicity figure used for evaluation."""
        texts = list(texts)
        if not texts:
            return []
        features = self._vectorizer.transform(texts)
        return self._model.predict_proba(features)[:, self._column].astype(float).tolist()

    toxicity = offensive_prob  # the name evaluation looks for

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [self.reward_from_prob(p) for p in self.offensive_prob(completions)]

    def reward_from_prob(self, p: float) -> float:
        """Map P(offensive) to the reward of this mode.

        The calibrated model returns exactly 0.0 or 1.0 for saturated texts, so the logit is
        taken of p clamped just inside (0, 1) and then clipped: one extreme text must not
        dominate a batch's reward whitening.
        """
        if self.mode == "prob":
            return 1.0 - p
        eps = 1e-12
        p = min(max(p, eps), 1.0 - eps)
        return max(-self.clip, min(self.clip, math.log((1.0 - p) / p)))
