"""Experiment tracking (`--report-to tensorboard|wandb|mlflow|none`) through Accelerate's trackers.

metrics.jsonl is always written; a tracker receives the same rows, with the standard PPO
diagnostics under the namespaced keys trackers show side by side (`env/reward_mean`,
`objective/kl`, `loss/policy`, ...) and every other number under `train/`. Accelerate runs the
trackers on the main process only, so a multi-process run logs once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.tracking import get_available_trackers

from tether.errors import TetherError

PROJECT = "tether"
TENSORBOARD_DIR = "tensorboard"  # under the run dir; the events land in tensorboard/tether/

# metrics.jsonl name -> tracker name (the conventions of TRL and OpenRLHF dashboards)
TRACKER_KEYS = {
    "reward_mean": "env/reward_mean",
    "reward_std": "env/reward_std",
    "kl_mean": "objective/kl",
    "kl_coef": "objective/kl_coef",
    "non_score_reward_mean": "objective/non_score_reward",
    "policy_loss": "loss/policy",
    "value_loss": "loss/value",
    "approx_kl": "policy/approx_kl",
    "clipfrac": "policy/clipfrac",
    "entropy": "policy/entropy",
    "vf_clipfrac": "val/clipfrac",
    "explained_variance": "val/explained_variance",
}
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def tracker_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics row under tracker names; `step` is the x-axis, not a value."""
    return {
        TRACKER_KEYS.get(key, f"train/{key}"): float(value)
        for key, value in row.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def check_tracker(report_to: str) -> None:
    """Fail before any compute is spent when the tracker's package is missing (Accelerate itself
    would only drop the tracker, silently)."""
    if report_to != "none" and report_to not in {str(t) for t in get_available_trackers()}:
        raise TetherError(
            f"--report-to {report_to}: the {_PACKAGES[report_to]} package is not installed "
            f"(pip install {_PACKAGES[report_to]})"
        )


def _hparams(config: Any) -> dict[str, str | int | float | bool]:
    """The run config as tracker hyper-parameters by flat option name: scalars as they are, the
    rest as text (TensorBoard's hparams refuse None and lists)."""
    return {
        k: v if isinstance(v, str | int | float | bool) else str(v)
        for k, v in config.flat().items()
    }


class Tracker:
    """One run's experiment tracker, or nothing for `none`."""

    def __init__(self, report_to: str, run_dir: Path, config: Any, start_step: int = 0) -> None:
        """`start_step` > 0: a resumed run. TensorBoard then hides the events the interrupted run
        logged from that step on (they were after its last checkpoint, and are logged again), so
        no step shows twice. W&B and MLflow start a new run."""
        self._accelerator = None
        if report_to == "none":
            return
        check_tracker(report_to)
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(
            project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR)
        )
        self._accelerator = Accelerator(log_with=report_to, project_config=project)
        self._accelerator.init_trackers(
            PROJECT,
            config=_hparams(config),
            init_kwargs={
                "wandb": {"name": run_dir.name},
                "mlflow": {"run_name": run_dir.name},
                "tensorboard": {"purge_step": start_step} if start_step else {},
            },
        )

    def log(self, row: dict[str, Any]) -> None:
        if self._accelerator is not None:
            self._accelerator.log(tracker_values(row), step=row["step"])

    def close(self) -> None:
        if self._accelerator is not None:
            self._accelerator.end_training()
