"""The Ray Tune trainable: one trial = one ``dualnet.fit``, reported every epoch with a checkpoint."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from dualnet import DualData, TrainConfig, fit
from dualnet.train import EpochReport

STATE_FILE = "state.pt"


def quiet_exits_in_callbacks() -> None:
    """Stop this process printing a ``SystemExit`` that Python cannot raise (a garbage-collection callback).

    Ray stops a trial worker with SIGTERM, and its handler raises ``SystemExit`` wherever the worker is.
    Inside a weakref or ``__del__`` callback Python cannot raise it: it prints "Exception ignored" with
    Ray's traceback into the sweep's output, and goes on. This drops only that print; what the worker
    does next is unchanged. Every other unraisable exception still goes to the hook that was there
    before. Installs once per process.
    """
    previous = sys.unraisablehook
    if getattr(previous, "quiets_exits", False):
        return

    def hook(unraisable) -> None:
        if not (unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit)):
            previous(unraisable)

    hook.quiets_exits = True
    sys.unraisablehook = hook


def train_trial(config: dict[str, Any], data: DualData) -> None:
    """Train ``config`` (TrainConfig fields) on ``data``, which arrives through the object store.

    On a retry after a crash, Ray hands back the trial's latest checkpoint and training
    continues from the epoch after it, exactly as the unbroken run would.
    """
    # Ray logs every persisted checkpoint at INFO; one line per epoch per trial floods the driver.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    quiet_exits_in_callbacks()
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / STATE_FILE, weights_only=True)

    node_id = ray.get_runtime_context().get_node_id()  # shows where each epoch ran on a cluster

    def report(epoch: EpochReport) -> None:
        with tempfile.TemporaryDirectory() as folder:
            torch.save(epoch.state(), Path(folder) / STATE_FILE)
            tune.report({**epoch.metrics, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(folder))

    fit(TrainConfig.from_dict(config), data, on_epoch=report, resume=resume)
