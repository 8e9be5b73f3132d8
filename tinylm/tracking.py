"""Experiment trackers: the check, before training, that the chosen one's package is installed.

Training logs through accelerate's trackers (`Accelerator(log_with=...)`). accelerate skips a
tracker whose package is missing with only a debug message, so a run would train for hours and
log nothing: `check_tracker_installed` makes that a `UserError` before any work, using
accelerate's own availability checks. The metric names are in docs/training.md#tracking.
"""

from __future__ import annotations

from accelerate.utils import (
    is_aim_available,
    is_clearml_available,
    is_comet_ml_available,
    is_dvclive_available,
    is_mlflow_available,
    is_swanlab_available,
    is_tensorboard_available,
    is_trackio_available,
    is_wandb_available,
)

from .errors import UserError

# Every tracker accelerate ships (accelerate.utils.LoggerType, less "all"): the check that its
# package is installed, and what to pip install. config.TRACKERS lists the same names, plus "none".
INSTALL = {
    "tensorboard": (is_tensorboard_available, "tensorboard"),  # or tensorboardX
    "wandb": (is_wandb_available, "wandb"),
    "trackio": (is_trackio_available, "trackio"),
    "mlflow": (is_mlflow_available, "mlflow"),
    "comet_ml": (is_comet_ml_available, "comet_ml"),
    "aim": (is_aim_available, "'aim<4'"),  # accelerate supports aim 3 only
    "clearml": (is_clearml_available, "clearml"),
    "dvclive": (is_dvclive_available, "dvclive"),
    "swanlab": (is_swanlab_available, "swanlab"),
}


def check_tracker_installed(tracker: str) -> None:
    """Raise `UserError` naming the `pip install` to run when `tracker`'s package is missing."""
    if tracker == "none":
        return
    available, package = INSTALL[tracker]
    if not available():
        raise UserError(f'training.tracker = "{tracker}" needs a package that is not installed: '
                        f'pip install {package} (or set training.tracker = "none")')


def flat_config(config: dict) -> dict:
    """A run's Config.to_dict() as one level of "section.key" names: what trackers show as hyperparameters.

    Trackers take numbers, strings and booleans (tensorboard refuses anything else), so a list
    (`lora.target_modules`) becomes one string: `c_attn, c_fc`."""
    return {f"{section}.{key}": ", ".join(value) if isinstance(value, list) else value
            for section, values in config.items() for key, value in values.items()}
