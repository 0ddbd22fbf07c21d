"""A compact live progress table: one line per trial epoch, one per trial end."""

from __future__ import annotations

import sys
import time

from ray import tune

from .config import Experiment


class ProgressTable(tune.Callback):
    """Prints trial, arch, lr, width, epoch and the experiment's metric as results arrive."""

    def __init__(self, experiment: Experiment, enabled: bool = True, stream=None):
        self._experiment = experiment
        self._header = (f"{'time':>6}  {'trial':<10} {'arch':<6} {'lr':>9} {'width':>5} {'epoch':>5}  "
                        f"{experiment.metric:>13}  note")
        self._enabled = enabled
        self._stream = stream or sys.stdout
        self._started = time.monotonic()
        self._lines = 0

    def restart(self, enabled: bool) -> None:
        """Print (or not) from now on, with times counted from now: for a table restored by --resume."""
        self._enabled = enabled
        self._started = time.monotonic()
        self._lines = 0

    def _print(self, trial, epoch: str, value: str, note: str) -> None:
        if not self._enabled:
            return
        if self._lines % 40 == 0:
            print(self._header, file=self._stream)
        config = trial.config
        elapsed = time.monotonic() - self._started
        print(f"{elapsed / 60:5.1f}m  {trial.trial_id:<10} {str(config.get('arch', '')):<6} "
              f"{config.get('lr', float('nan')):>9.2e} {config.get('width', ''):>5} {epoch:>5}  {value:>13}  {note}",
              file=self._stream, flush=True)
        self._lines += 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self._experiment.metric)
        note = "diverged" if result.get("status") == "diverged" else ""
        self._print(trial, f"{result.get('epoch', '?')}/{self._experiment.epochs}",
                    f"{value:.4f}" if isinstance(value, float) else str(value), note)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = last.get("epoch", 0)
        # ASHA, a spent time budget and Ctrl+C all end a trial here alike; which one is not known yet.
        note = "completed" if done >= self._experiment.epochs else (
            "diverged" if last.get("status") == "diverged" else "stopped early")
        self._print(trial, f"{done}/{self._experiment.epochs}", "", note)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trial, "", "", f"ERROR (retries exhausted); see {trial.path}/error.txt")
