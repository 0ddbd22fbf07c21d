"""Fashion-MNIST paired with random numbers, held as tensors.

Finding the files (first hit wins):
  1. an explicit ``data_dir`` (``--data-dir``) or ``$DUALNET_DATA_DIR``;
  2. the project's cache (``$DUALNET_CACHE_DIR``, default ``~/.cache/dualnet``);
  3. well-known folders that hold the four IDX files, such as
     ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``;
  4. torchvision's download into the cache, unless ``download=False``.

Whatever folder supplies the files, they are checked, unpacked into the cache
in torchvision's layout and then read by ``torchvision.datasets.FashionMNIST``.
"""

from __future__ import annotations

import gzip
import numbers
import os
import shutil
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import write_atomic

IMAGE_SIZE = 28
NUM_CLASSES = 10
NUM_NUMBERS = 10
NUM_SUMS = NUM_CLASSES + NUM_NUMBERS - 1

IDX_FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}
WELL_KNOWN_DIRS = ("/usr/share/datasets/fashion-mnist", "./data/fashion-mnist", "./data")
# How to name the data folder to a user of either CLI.
_DATA_DIR_HINT = "--data-dir DIR (data.dir in an experiment file)"

# Offsets added to the seed so the three kinds of random draws never share a stream.
_SPLIT_STREAM, _EVAL_STREAM, _TRAIN_STREAM = 1_000_003, 2_000_003, 3_000_003
# Seeds above this would overflow the arithmetic that derives each stream's generator seed.
MAX_SEED = 2 ** 31


def check_seed(name: str, seed: int) -> None:
    """Raise ValueError, naming ``name``, unless ``seed`` is an integer in [0, ``MAX_SEED``)."""
    if not is_integer(seed) or not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name}: must be an integer in [0, {MAX_SEED}), got {seed!r}")


def is_integer(value: object) -> bool:
    """True for Python and numpy integers; False for bools, which Python counts as integers."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    """True for Python and numpy real numbers, integers included; False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class DataError(Exception):
    """The dataset could not be found or is damaged; the message says how to fix it."""


def cache_dir() -> Path:
    """Return the project's cache folder (``$DUALNET_CACHE_DIR`` or ``~/.cache/dualnet``)."""
    return Path(os.environ.get("DUALNET_CACHE_DIR") or Path.home() / ".cache" / "dualnet")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz",
                      folder / "FashionMNIST" / "raw" / stem, folder / "FashionMNIST" / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_bytes(path: Path) -> bytes:
    """Return the decompressed bytes of an IDX file, validated against its header.

    Raises:
        DataError: the file is not gzip when it says so, is truncated, or its
            header does not describe a Fashion-MNIST array.
    """
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    magic_expected, shape_expected = IDX_FILES[stem]
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"corrupt IDX file {path}: {exc}; delete it, or point --data-dir (data.dir in an experiment "
                        f"file) at good files") from None
    ndim = len(shape_expected)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated IDX file {path}: {len(raw)} bytes is shorter than its header")
    magic, *shape = struct.unpack(f">I{ndim}I", raw[:header])
    if magic != magic_expected:
        raise DataError(f"corrupt IDX file {path}: magic number {magic}, expected {magic_expected}")
    if tuple(shape[1:]) != shape_expected[1:]:
        raise DataError(f"corrupt IDX file {path}: shape {tuple(shape)}, expected (N, {shape_expected[1:]})")
    expected_len = header + int(torch.tensor(shape).prod())
    if len(raw) != expected_len:
        raise DataError(f"truncated IDX file {path}: {len(raw)} bytes, header promises {expected_len}")
    return raw


def _stage_into_cache(found: dict[str, Path], raw_folder: Path) -> None:
    """Validate the four files and write them, unpacked, into torchvision's raw folder.

    Each file lands through a temporary name and an atomic rename, so a crash never
    leaves a half-written file that a later run would trust.
    """
    contents = {stem: _read_idx_bytes(path) for stem, path in found.items()}
    images, labels = contents["train-images-idx3-ubyte"], contents["train-labels-idx1-ubyte"]
    for img, lab, name in ((images, labels, "train"),
                           (contents["t10k-images-idx3-ubyte"], contents["t10k-labels-idx1-ubyte"], "t10k")):
        n_img, n_lab = struct.unpack(">I", img[4:8])[0], struct.unpack(">I", lab[4:8])[0]
        if n_img != n_lab:
            raise DataError(f"{name} images ({n_img}) and labels ({n_lab}) disagree in count in "
                            f"{found[name + '-images-idx3-ubyte'].parent}")
    raw_folder.mkdir(parents=True, exist_ok=True)
    for stem, data in contents.items():
        if (raw_folder / stem).exists() and found[stem] == raw_folder / stem:
            continue
        write_atomic(raw_folder / stem, data)


def _candidate_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    explicit = data_dir or os.environ.get("DUALNET_DATA_DIR")
    if explicit:
        return [Path(explicit)]
    return [cache_dir(), *(Path(d) for d in WELL_KNOWN_DIRS)]


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load Fashion-MNIST through ``torchvision.datasets.FashionMNIST``.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 images of
        shape (N, 28, 28) and int64 labels of shape (N,).

    Raises:
        DataError: no folder holds the files and the download is off or failed,
            or a file is truncated or corrupt (the message names it).
    """
    from torchvision.datasets import FashionMNIST

    root = cache_dir()
    raw_folder = root / "FashionMNIST" / "raw"
    looked = []
    for folder in _candidate_dirs(data_dir):
        looked.append(str(folder))
        found = {stem: _find_idx(folder, stem) for stem in IDX_FILES}
        if all(found.values()):
            _stage_into_cache(found, raw_folder)
            break
        if data_dir or os.environ.get("DUALNET_DATA_DIR"):
            # The same folder arrives as --data-dir, an experiment's data.dir or confirm's flag; name none.
            source = "data folder" if data_dir else "DUALNET_DATA_DIR"
            if not folder.is_dir():
                raise DataError(f"{source} {folder} does not exist; point it at a folder holding the four "
                                f"Fashion-MNIST IDX files")
            missing = ", ".join(stem for stem, path in found.items() if path is None)
            raise DataError(f"{source} {folder} lacks Fashion-MNIST IDX files ({missing}[.gz]); "
                            f"point it at a folder holding all four")
    else:
        if not download:
            raise DataError(f"Fashion-MNIST not found (looked in {', '.join(looked)}) and download is off; "
                            f"pass {_DATA_DIR_HINT} with the four IDX files, or install Debian's "
                            f"dataset-fashion-mnist, or allow the download")
        try:
            FashionMNIST(str(root), train=True, download=True)
        except Exception as exc:  # torchvision raises bare RuntimeError/URLError on network failure
            shutil.rmtree(raw_folder, ignore_errors=True)
            raise DataError(f"Fashion-MNIST not found (looked in {', '.join(looked)}) and the download "
                            f"failed ({type(exc).__name__}); pass {_DATA_DIR_HINT} with the four IDX files "
                            f"or install Debian's dataset-fashion-mnist") from None
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)
    return train.data.contiguous(), train.targets.long(), test.data.contiguous(), test.targets.long()


@dataclass
class Split:
    """One split: uint8 images (N, 28, 28), labels (N,), and numbers (N,) when fixed."""

    images: torch.Tensor
    labels: torch.Tensor
    numbers: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sums(self) -> torch.Tensor:
        """Labels plus numbers. Raises ValueError for the training split, whose numbers are drawn per epoch."""
        if self.numbers is None:
            raise ValueError("this split has no fixed numbers (the training split draws them each epoch, see "
                             "DualData.train_numbers); score the validation or test split")
        return self.labels + self.numbers

    def __reduce__(self):
        # Pickled as numpy arrays: Ray's object store then hands every worker on a node a
        # zero-copy view of one shared buffer, so the images are held once per node, not per trial.
        arrays = [None if t is None else t.cpu().numpy() for t in (self.images, self.labels, self.numbers)]
        return _split_from_numpy, tuple(arrays)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device),
                     None if self.numbers is None else self.numbers.to(device))


def _split_from_numpy(images, labels, numbers) -> Split:
    def tensor(array):
        if array is None:
            return None
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only shared memory; nothing writes to them.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(array)

    return Split(tensor(images), tensor(labels), tensor(numbers))


@dataclass
class DualData:
    """Training, validation and test splits for the two-input task.

    Validation and test numbers are fixed by ``seed`` when the data is built, so every
    trial scores on identical pairs. Training numbers and order come from
    ``train_numbers`` and ``train_order``, seeded by the training run's own seed.
    """

    train: Split
    val: Split
    test: Split
    seed: int

    def train_numbers(self, seed: int, epoch: int) -> torch.Tensor:
        """Return the training numbers for ``epoch``: fresh each epoch, the same for the same seed."""
        gen = torch.Generator().manual_seed(seed * 7919 + epoch + _TRAIN_STREAM)
        return torch.randint(0, NUM_NUMBERS, (len(self.train),), generator=gen)

    def train_order(self, seed: int, epoch: int) -> torch.Tensor:
        """Return the shuffled order of training images for ``epoch``."""
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        return torch.randperm(len(self.train), generator=gen)


def make_data(train_images: torch.Tensor, train_labels: torch.Tensor,
              test_images: torch.Tensor, test_labels: torch.Tensor,
              val_size: int = 10_000, seed: int = 0, train_subset: int | None = None) -> DualData:
    """Split off a seeded validation set and pair validation and test images with fixed numbers.

    Args:
        val_size: images held out of the training set for validation (used by search); 0 trains
            on all of them (confirmation runs).
        seed: seeds the split and the fixed validation and test numbers.
        train_subset: keep only this many training images (quick runs); None keeps all.

    Raises:
        ValueError: images that are not uint8 (N, 28, 28), labels that do not match them or lie
            outside 0-9, ``val_size`` or ``train_subset`` not an integer or leaving no training
            images, or ``seed`` outside [0, 2**31).
    """
    check_seed("data seed", seed)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        _check_images_and_labels(name, images, labels)
    for name, value in (("val_size", val_size), ("train_subset", train_subset)):
        if value is not None and not is_integer(value):
            raise ValueError(f"{name}={value!r} must be an integer")
    n = len(train_labels)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size={val_size} must be between 0 (train on all images) and {n - 1}")
    gen = torch.Generator().manual_seed(seed + _SPLIT_STREAM)
    order = torch.randperm(n, generator=gen)
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset is not None:
        if not 0 < train_subset <= len(train_idx):
            raise ValueError(f"train_subset={train_subset} must be between 1 and {len(train_idx)}")
        train_idx = train_idx[:train_subset]
    # Both start at the stream's first draw, so the test pairs are the same whatever val_size is and
    # every run is scored on them. The two number sequences repeat each other, which links nothing:
    # the images they pair with are different ones.
    def eval_numbers(count: int) -> torch.Tensor:
        return torch.randint(0, NUM_NUMBERS, (count,), generator=torch.Generator().manual_seed(seed + _EVAL_STREAM))

    val_numbers, test_numbers = eval_numbers(val_size), eval_numbers(len(test_labels))
    return DualData(
        train=Split(train_images[train_idx].contiguous(), train_labels[train_idx].contiguous()),
        val=Split(train_images[val_idx].contiguous(), train_labels[val_idx].contiguous(), val_numbers),
        test=Split(test_images.contiguous(), test_labels.contiguous(), test_numbers),
        seed=seed,
    )


def _check_images_and_labels(name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 3
            and tuple(images.shape[1:]) == (IMAGE_SIZE, IMAGE_SIZE)):
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{name} images must be a uint8 tensor of shape (N, 28, 28) with values 0-255, got {got}")
    if not (torch.is_tensor(labels) and labels.dim() == 1 and not labels.is_floating_point()
            and labels.dtype != torch.bool):
        got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(f"{name} labels must be a 1-d integer tensor, got {got}")
    if len(labels) != len(images):
        raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{name} labels must lie in 0..{NUM_CLASSES - 1}, got {int(labels.min())}..{int(labels.max())}")


def load_data(data_dir: str | os.PathLike | None = None, download: bool = True, val_size: int = 10_000,
              seed: int = 0, train_subset: int | None = None) -> DualData:
    """Find and load Fashion-MNIST, then build the paired splits (see ``make_data``).

    Raises:
        DataError: as ``load_fashion_mnist``.
        ValueError: as ``make_data``.
    """
    return make_data(*load_fashion_mnist(data_dir, download), val_size=val_size, seed=seed,
                     train_subset=train_subset)


def pixel_overlap_fraction(images: torch.Tensor) -> float:
    """Return the share of images with garment ink in the 10 pixels the ``pixel`` design overwrites."""
    return float((images[:, -1, -NUM_NUMBERS:] > 0).any(dim=1).float().mean())
