"""HateSonar as the gold judge: hate / offensive / neither (Davidson et al. 2017), ONNX.

It is the embedded default *gold judge*, not the reward: an independent classifier (different
training data, different features) that tether reports next to the proxy reward, so a policy that
learns to fool the proxy shows up as proxy and gold diverging. It can still serve as a reward
through `score()` when a user wants one.

The model is a scikit-learn TF-IDF + logistic-regression pipeline exported to ONNX. Its first
op, StringNormalizer (lower-casing), carries no `locale` attribute, so onnxruntime builds a C++
`std::locale("en_US.UTF-8")` when the session is created. The environment (LANG, LC_ALL) plays no
part: what matters is whether that locale is *installed* on the system. Without it the session
fails with "Failed to construct locale with name:en_US.UTF-8"; we check first and say how to fix
it in one line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

from tether.errors import TetherError

LOCALE = "en_US.UTF-8"
LOCALE_FIX = (
    "apt-get update && apt-get install -y locales && "
    "sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' /etc/locale.gen && locale-gen"
)
LOCALE_MISSING = (
    f"the HateSonar judge needs the {LOCALE} locale installed on this system (onnxruntime "
    f"asks for it by name; LANG/LC_ALL do not help), and it is missing; as root run: {LOCALE_FIX}"
)
INSTALL_HINT = "pip install hatesonar==0.1.0 onnxruntime"
CLASSES = ("hate_speech", "offensive_language", "neither")
_BATCH = 256


def locale_available(name: str = LOCALE) -> bool:
    """Whether the C library can build the named locale, without touching the process locale.

    glibc's newlocale() reads the same locale archive that libstdc++'s std::locale does; setting
    Python's locale instead would change global state under every other thread. Off glibc we
    cannot ask cheaply and answer True: onnxruntime's own error is still caught.
    """
    if not sys.platform.startswith("linux"):
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        newlocale, freelocale = libc.newlocale, libc.freelocale
    except (OSError, AttributeError):
        return True
    newlocale.restype = ctypes.c_void_p
    newlocale.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p]
    freelocale.argtypes = [ctypes.c_void_p]
    handle = newlocale(1, name.encode(), None)  # 1 = LC_CTYPE_MASK on glibc: what lowercasing uses
    if not handle:
        return False
    freelocale(handle)
    return True


class HateSonarJudge:
    """Toxicity = 1 - P(neither): hate speech and offensive language both count against."""

    name = "hatesonar"

    def __init__(self) -> None:
        try:
            import onnxruntime as ort
            from hatesonar.api import DEFAULT_MODEL_FILE
        except ImportError as e:
            raise TetherError(
                f"the HateSonar judge needs hatesonar ({e}); {INSTALL_HINT}"
            ) from None
        if not locale_available():
            raise TetherError(LOCALE_MISSING)
        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures surface as exceptions; no coloured stderr dump
        # The graph is a handful of tiny sparse ops: one thread scores about as fast as a pool
        # (benchmarks/cpu_choices.py --only judge) and leaves the cores to the policy's torch
        # threads, which score and train beside it.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            # Sonar.ping() runs one text per call; a session of our own scores whole batches.
            self._session = ort.InferenceSession(
                str(DEFAULT_MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            if "locale" in str(e):
                raise TetherError(LOCALE_MISSING) from None
            raise

    def class_probs(self, texts: list[str]) -> list[dict[str, float]]:
        """P(hate_speech), P(offensive_language), P(neither) per text."""
        import numpy as np

        texts = list(texts)
        out: list[dict[str, float]] = []
        for start in range(0, len(texts), _BATCH):
            batch = np.array(texts[start : start + _BATCH], dtype=object)
            _, probs = self._session.run(None, {"text": batch})
            out.extend(_named(p) for p in probs)
        return out

    def toxicity(self, texts: list[str]) -> list[float]:
        """1 - P(neither) per text, in [0, 1]."""
        return [1.0 - p["neither"] for p in self.class_probs(texts)]

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """1 - toxicity of the completion (the prompt is the same for every sample of it)."""
        return [1.0 - t for t in self.toxicity(completions)]


def _named(probs: dict[int, Any]) -> dict[str, float]:
    return {name: float(probs[i]) for i, name in enumerate(CLASSES)}
