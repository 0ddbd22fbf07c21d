"""Helpers for tests that run real sweeps through the CLI on small synthetic IDX data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import yaml

from .conftest import REPO, write_dataset


def tiny_experiment(folder: Path, name: str = "tiny", **changes) -> Path:
    """Write a small synthetic dataset and an experiment file for it under ``folder``; return the file."""
    data_dir = folder / "idx"
    if not data_dir.exists():
        write_dataset(data_dir, n_train=1500, n_test=300)
    raw = {"name": name, "num_samples": 6, "max_concurrent": 2, "epochs": 2, "seed": 0,
           "searcher": {"type": "tpe", "n_startup_trials": 3},
           "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
           "resources": {"cpu": 1}, "data": {"dir": str(data_dir), "download": False, "val_size": 300},
           "storage": str(folder / "runs"),
           "space": {"arch": {"choice": ["late", "pixel"]}, "lr": {"loguniform": [1e-3, 2e-2]},
                     "width": {"choice": [4, 8]}, "hidden": 32, "batch_size": 64}}
    for key, value in changes.items():
        raw[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DUALNET_CACHE_DIR=str(folder / "cache"), PYTHONWARNINGS="always::DeprecationWarning",
               RAY_ADDRESS="")
    return env


def run_cli(folder: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tune", *args], cwd=REPO, env=sweep_env(folder),
                          capture_output=True, text=True, timeout=timeout)


def load_study(run_dir: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def read_trials_csv(path: Path) -> pd.DataFrame:
    """Read a sweep's trials.csv with trial ids as text: pandas would read ids such as 12345678 or
    997250e5 as numbers."""
    return pd.read_csv(path, dtype={"trial_id": str})
