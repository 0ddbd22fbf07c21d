"""The two fusion designs, a registry to build them by name, and saved-model I/O.

Every model takes raw uint8 images (N, 28, 28) and integer numbers (N,) and returns
``(class_logits, sum_logits)``. Normalisation and the pixel write happen inside,
so a saved model needs nothing else from its user.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from .files import atomic_path, first_line
from .data import IMAGE_SIZE, NUM_CLASSES, NUM_NUMBERS, NUM_SUMS, is_integer, is_real

# Fashion-MNIST training-set pixel statistics on the [0, 1] scale.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
SAVE_FORMAT = 1

ARCHS: dict[str, type["DualNet"]] = {}


def register(name: str) -> Callable[[type["DualNet"]], type["DualNet"]]:
    """Class decorator: make a design buildable as ``build_model(name, ...)``."""
    def add(cls: type[DualNet]) -> type[DualNet]:
        ARCHS[name] = cls
        cls.arch = name
        return cls
    return add


def _stage(c_in: int, c_out: int, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    # The pool comes before the stage's last ReLU: a ReLU commutes with max (it is monotone), so the
    # outputs and gradients are the same, and that ReLU then runs on a quarter of the elements.
    return layers[:-1] + [nn.MaxPool2d(2), layers[-1]]


class DualNet(nn.Module):
    """Shared parts: a two-stage CNN trunk (28 -> 14 -> 7), a hidden layer, two heads.

    The trunk ends in a flatten, never a global pool, so position survives; the
    ``pixel`` design depends on that.
    """

    arch = "base"
    extra_features = 0  # inputs the fully connected layer takes besides the CNN features

    def __init__(self, width: int = 16, hidden: int = 256, dropout: float = 0.0, depth: int = 2):
        super().__init__()
        for name, value, low in (("width", width, 1), ("hidden", hidden, 1), ("depth", depth, 1)):
            if not is_integer(value) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if not is_real(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be a number in [0, 1)")
        self.hparams = {"width": int(width), "hidden": int(hidden), "dropout": float(dropout), "depth": int(depth)}
        self.trunk = nn.Sequential(*_stage(1, width, depth), *_stage(width, 2 * width, depth), nn.Flatten())
        features = 2 * width * (IMAGE_SIZE // 4) ** 2
        self.fc = nn.Sequential(nn.Linear(features + self.extra_features, hidden), nn.ReLU(inplace=True),
                                nn.Dropout(dropout))
        self.class_head = nn.Linear(hidden, NUM_CLASSES)
        self.sum_head = nn.Linear(hidden, NUM_SUMS)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 28, 28) -> normalised float (N, 1, 28, 28)."""
        return ((images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1)

    def prepare(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Return the float image tensor (N, 1, 28, 28) that enters the CNN trunk."""
        return self.normalize(images)

    def features(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        """Return what enters the fully connected layer."""
        return self.trunk(self.prepare(images, numbers))

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.fc(self.features(images, numbers))
        return self.class_head(hidden), self.sum_head(hidden)

    @torch.inference_mode()
    def predict(self, images, numbers, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict from raw inputs.

        Args:
            images: uint8 array or tensor, (N, 28, 28) or a single (28, 28) image.
            numbers: integers 0-9, shape (N,) or a scalar.

        Returns:
            ``(class_pred, sum_pred)``: int64 tensors of shape (N,) on the CPU.

        Raises:
            ValueError: wrong shapes, dtype or number range, or ``batch_size`` below 1.
        """
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        numbers = torch.as_tensor(np.asarray(numbers) if not torch.is_tensor(numbers) else numbers)
        if numbers.is_floating_point() or numbers.is_complex() or numbers.dtype == torch.bool:
            raise ValueError(f"numbers must be integers 0..{NUM_NUMBERS - 1}, got dtype {numbers.dtype}")
        numbers = numbers.long()
        if images.dim() == 2:
            if numbers.numel() != 1:
                raise ValueError(f"one image takes one number, got shape {tuple(numbers.shape)}")
            images, numbers = images.unsqueeze(0), numbers.reshape(1)
        if images.dtype != torch.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"images must be uint8 of shape (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
        if numbers.shape != images.shape[:1]:
            raise ValueError(f"numbers must have shape ({len(images)},), got {tuple(numbers.shape)}")
        if len(numbers) and (numbers.min() < 0 or numbers.max() >= NUM_NUMBERS):
            raise ValueError(f"numbers must lie in 0..{NUM_NUMBERS - 1}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        class_pred, sum_pred = [], []
        for start in range(0, len(images), batch_size):
            class_logits, sum_logits = self(images[start:start + batch_size].to(device),
                                            numbers[start:start + batch_size].to(device))
            class_pred.append(class_logits.argmax(1).cpu())
            sum_pred.append(sum_logits.argmax(1).cpu())
        self.train(was_training)
        empty = torch.empty(0, dtype=torch.long)
        return (torch.cat(class_pred) if class_pred else empty), (torch.cat(sum_pred) if sum_pred else empty)


@register("late")
class LateFusion(DualNet):
    """CNN features of the image, concatenated with the one-hot number at the fully connected layer."""

    extra_features = NUM_NUMBERS

    def features(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        image_features = self.trunk(self.prepare(images, numbers))
        return torch.cat([image_features, F.one_hot(numbers, NUM_NUMBERS).to(image_features.dtype)], dim=1)


@register("pixel")
class PixelFusion(DualNet):
    """The one-hot number overwrites the last 10 pixels (row 27, columns 18-27) before the CNN.

    The write comes after normalisation, so the code is exactly 0s and a 1 whatever
    the pixel statistics; the garment ink it replaces is lost (see
    ``dualnet.data.pixel_overlap_fraction``).
    """

    def prepare(self, images: torch.Tensor, numbers: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images)
        x[:, 0, IMAGE_SIZE - 1, IMAGE_SIZE - NUM_NUMBERS:] = F.one_hot(numbers, NUM_NUMBERS).to(x.dtype)
        return x


def build_model(arch: str, width: int = 16, hidden: int = 256, dropout: float = 0.0, depth: int = 2) -> DualNet:
    """Build a design by name.

    Returns:
        A freshly initialised model (CPU, float32, train mode).

    Raises:
        ValueError: unknown ``arch`` or a bad size.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](width=width, hidden=hidden, dropout=dropout, depth=depth)


def save_model(model: DualNet, path: str | os.PathLike | BinaryIO, extra: dict | None = None) -> None:
    """Write the model's design, sizes and weights to ``path`` atomically (temp file + rename),
    or into an open binary file.

    ``extra`` is kept beside the weights (say, the training config and history).

    Raises:
        ValueError: ``extra`` holds something other than plain data (dicts, lists, tuples, str, int,
            float, bool, None), which ``load_model``'s safe loading would refuse.
    """
    _check_plain_data(extra or {}, "extra")
    payload = {"format": SAVE_FORMAT, "arch": model.arch, "hparams": model.hparams,
               "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "extra": extra or {}}
    if hasattr(path, "write"):
        torch.save(payload, path)
        return
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _check_plain_data(value: object, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise ValueError(f"{where}: key {key!r} is not a string or an integer")
            _check_plain_data(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain_data(item, f"{where}[{index}]")
    elif not (value is None or type(value) in (str, bool, int, float)):  # not subclasses such as numpy.float64
        raise ValueError(f"{where} is a {type(value).__name__}; save_model keeps only plain data (dict, list, str, "
                         f"int, float, bool, None), which load_model can read back safely")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> DualNet:
    """Load a model saved by ``save_model`` (weights only, no pickled code).

    Returns:
        The model in eval mode, ready for ``predict(images, numbers)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a dualnet model.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable dualnet model: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not a dualnet model file (format {SAVE_FORMAT})")
    try:
        model = build_model(payload["arch"], **payload["hparams"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: torch's shape mismatch
        raise ValueError(f"{path} is a damaged dualnet model file ({type(exc).__name__}: {first_line(exc)})") from None
    return model.to(device).eval()
