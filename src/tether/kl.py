"""KL coefficient controllers: the leash's length.

A fixed coefficient is simplest; the adaptive controller of Ziegler et al. 2019 (arXiv 1909.08593,
section 2.2) steers the measured KL toward a target, so the same config works across rewards
whose scales differ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class FixedKLController:
    """beta stays at its initial value."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Ignore the measurement; return the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller: beta_{k+1} = beta_k * (1 + clip(KL / target - 1, -0.2, 0.2) * n / H).

    `current_kl` is the mean per-sequence KL (nats) of the last batch, `n_steps` the number of
    samples in it and `horizon` H how many samples it should take to close the error.
    """

    value: float
    target: float
    horizon: int = 10_000

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta toward the value that would give `target` KL; returns the new beta.

        A non-finite KL (a batch whose log-probs overflowed; its update is skipped too) leaves
        beta as it is: one bad batch must not poison the leash for the rest of the run."""
        if not math.isfinite(current_kl):
            return self.value
        # e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        # beta_{t+1} = beta_t * (1 + K_beta * e_t), with K_beta = n_steps / horizon
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kl_coef: float, target_kl: float | None, horizon: int) -> KLController:
    """Adaptive when a target is given, fixed otherwise."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
