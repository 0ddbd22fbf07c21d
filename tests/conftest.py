"""Shared fixtures: small synthetic Fashion-MNIST-shaped IDX files written by the tests themselves."""

from __future__ import annotations

import gzip
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dualnet.data import make_data

REPO = Path(__file__).resolve().parent.parent


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when asked."""
    magic = 2051 if array.ndim == 3 else 2049
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def synthetic_arrays(n_train: int, n_test: int, seed: int = 0):
    """Images whose class is drawn in: a bright 6x6 block at one of 10 places, over noise.

    Rows 24-27 stay noise only, so the ``pixel`` design's write hides nothing.
    """
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k in range(10):
            r, c = 2 + 7 * (k // 4), 1 + 7 * (k % 4)
            images[labels == k, r:r + 6, c:c + 6] = 230
        out += [images, labels]
    return out


def write_dataset(folder: Path, n_train: int = 3000, n_test: int = 600, compress: bool = True, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels, test_images, test_labels = synthetic_arrays(n_train, n_test, seed)
    write_idx(folder / "train-images-idx3-ubyte", train_images, compress)
    write_idx(folder / "train-labels-idx1-ubyte", train_labels, compress)
    write_idx(folder / "t10k-images-idx3-ubyte", test_images, compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", test_labels, compress)
    return train_images, train_labels, test_images, test_labels


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own dualnet cache and no inherited data folder."""
    monkeypatch.setenv("DUALNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DUALNET_DATA_DIR", raising=False)


@pytest.fixture
def cli_in_process(capsys, monkeypatch):
    """Run a CLI's ``main`` in this process and return what ``subprocess.run`` would, for the tests of
    refusals: a fresh interpreter spends 3-4 s importing torch and Ray, and a refusal needs nothing it gives.

    Warnings raised during the call are appended to stderr as the CLI would print them, so a refusal that
    also warns still fails a one-line check. The tests that run work keep a real subprocess.
    """
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the dualnet CLI sets its own

    def run(main, *argv: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
        shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(argv), code, out, err + shown)

    return run


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("idx")
    write_dataset(folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_data():
    """DualData built from synthetic arrays (no files), 3000 images with 600 for validation."""
    arrays = [torch.from_numpy(a).long() if a.ndim == 1 else torch.from_numpy(a) for a in synthetic_arrays(3000, 600)]
    return make_data(*arrays, val_size=600, seed=0)


@pytest.fixture(scope="session")
def sweep(tmp_path_factory):
    """The session's one tiny real sweep (Ray Tune + Optuna TPE + ASHA, both designs, 8 trials x 2 epochs).

    Returns:
        (run folder, the finished CLI process).
    """
    from .sweeps import run_cli, tiny_experiment

    folder = tmp_path_factory.mktemp("sweep")
    experiment = tiny_experiment(folder, num_samples=8)
    proc = run_cli(folder, "sweep", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "runs" / "tiny", proc
