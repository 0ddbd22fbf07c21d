"""The training loop: ``fit(config, data, on_epoch=...)``.

A plain loop in the spirit of pytorch/examples. Its speed comes from slicing
batches out of tensors already on the device, channels_last weights, bf16
autocast, fused optimizer steps and process settings (threads, the C allocator),
not from a framework.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import DualData, Split, check_seed, is_real
from .files import first_line, load_yaml
from .metrics import evaluate
from .models import ARCHS, DualNet, build_model

OPTIMIZERS = ("adamw", "sgd")
# The share of a OneCycle run spent warming the learning rate up (torch's default, named because
# the sweep harness places ASHA's first rung after it).
ONECYCLE_WARMUP = 0.3
SCHEDULES = ("onecycle", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
MAX_THREADS = 1024


@dataclass
class TrainConfig:
    """Everything one training run needs; defaults are the project's baseline."""

    arch: str = "late"
    epochs: int = 10
    width: int = 16
    hidden: int = 256
    depth: int = 2
    dropout: float = 0.0
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    batch_size: int = 128
    seed: int = 0
    threads: int = 0  # 0 leaves torch's default
    precision: str = "auto"  # auto = bf16 where the device computes it natively, else fp32 (pick_precision)
    channels_last: bool = True
    device: str = "auto"  # auto = CUDA when present, else CPU

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a validated config from plain data (YAML, a Tune config, CLI flags).

        Raises:
            ValueError: an unknown key, a wrong type or an out-of-range value; the
                message names the key.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known), key=str)  # YAML may give bool or int keys (yes:, 1:)
        if unknown:
            raise ValueError(f"unknown training setting {unknown[0]!r}; known: {', '.join(known)}")
        converted = {}
        for key, value in values.items():
            # Numbers convert where nothing is lost: 64.0 and numpy's int64(64) to 64, an int to a float.
            kind = type(getattr(cls, key))
            if is_real(value):
                if kind is int and float(value).is_integer():
                    value = int(value)
                elif kind is float:
                    value = float(value)
            converted[key] = value
        config = cls(**converted)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first setting of the wrong type or out of range."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if type(value) is not kind:  # exactly: a bool is not an int here, nor a str a bool
                raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"{f.name}: must be a finite number, got {value!r}")
        choices = {"arch": tuple(ARCHS), "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
                   "precision": PRECISIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("epochs", "width", "hidden", "depth", "batch_size", "lr")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        check_seed("seed", self.seed)
        if self.weight_decay < 0 or self.threads < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay and threads must be >= 0 and momentum in [0, 1)")
        if self.threads > MAX_THREADS:  # far more makes the OpenMP runtime crash the process
            raise ValueError(f"threads: at most {MAX_THREADS}, got {self.threads}; 0 leaves torch's default "
                             f"(this machine's cores)")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"device: {self.device!r} is not auto, cpu or cuda[:N]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochReport:
    """What ``fit`` hands ``on_epoch`` after each epoch."""

    epoch: int
    metrics: dict[str, Any]
    state: Callable[[], dict[str, Any]]  # builds a resumable checkpoint on demand


@dataclass
class FitResult:
    """The outcome of ``fit``: status ``completed`` or ``diverged``, the per-epoch metrics, the model."""

    status: str
    history: list[dict[str, Any]]
    model: DualNet
    config: TrainConfig = field(repr=False, default_factory=TrainConfig)


def load_config_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read training settings from YAML: one mapping of ``TrainConfig`` fields, or
    ``configs:`` with a list of them (at most one per design). A ``meta:`` mapping is kept
    for people and ignored here.

    Returns:
        The raw settings, one dict per config, each validated by ``TrainConfig.from_dict``.

    Raises:
        ValueError: unreadable YAML, a wrong shape, or a bad setting (named).
        OSError: the file cannot be read.
    """
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise OSError(f"{path}: cannot read config file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a YAML text file") from None
    try:
        loaded = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of training settings, got {type(loaded).__name__}")
    loaded = {k: v for k, v in loaded.items() if k != "meta"}
    if "configs" in loaded:
        entries = loaded.pop("configs")
        if loaded or not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: 'configs' must be a non-empty list and stand alone beside 'meta'")
    else:
        entries = [loaded]
    archs = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: each config must be a mapping, got {entry!r}")
        try:
            archs.append(TrainConfig.from_dict(entry).arch)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    for arch in sorted({a for a in archs if archs.count(a) > 1}):
        # Commands pick, name and pool a file's configs by design, so two for one design would clash.
        raise ValueError(f"{path}: {archs.count(arch)} configs for the {arch!r} design; a file holds at most one "
                         f"per design (export one with 'python -m tune best RUN_DIR --by arch')")
    return entries


def pick_device(name: str) -> torch.device:
    """Resolve ``auto`` to CUDA when present, else CPU.

    Raises:
        ValueError: ``name`` asks for a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use auto or cpu")
    return device


def native_bf16(device: torch.device) -> bool:
    """Return whether ``device`` runs bf16 convolutions on fast kernels.

    On a CPU that is PyTorch's own test for handing bf16 convolutions to oneDNN (AVX-512 or
    AMX on x86, bf16 instructions on Arm). Where it fails, as on AVX2-only x86 such as AMD
    Zen 3, bf16 convolutions run on PyTorch's reference path instead: there a 16-channel convolution
    took 14x as long in bf16 as in fp32 with channels_last, and a width-16 training epoch 8x (README,
    Performance).
    """
    if device.type == "cuda":
        # Ampere (compute capability 8.0) and later have bf16 tensor cores; older GPUs only emulate bf16.
        return torch.cuda.get_device_properties(device).major >= 8
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pick_precision(name: str, device: torch.device) -> str:
    """Resolve ``auto`` to ``bf16`` where ``device`` has native bf16 (``native_bf16``), else ``fp32``.

    Returns:
        ``bf16`` or ``fp32``; an explicit ``name`` is returned as it is.
    """
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse instead of returning it to the OS.

    Every training step frees and reallocates the same few-MiB activation and gradient buffers.
    Under glibc's defaults, blocks that size are mmap-ed and unmapped (or trimmed off the heap)
    each time, so each step page-faults its buffers in again: thousands of faults per width-16
    fp32 step at batch 128 (tests/test_train.py counts them), fewer in bf16. Raising the mmap
    threshold to 64 MiB and the trim threshold to 1 GiB removes them. It changes where freed
    memory waits, not peak memory. Process-wide, like ``torch.set_num_threads``.

    Returns:
        True if the C library took the settings; False where the C library is not glibc.
    """
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2 ** 20)) & bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 30))


def _optimizer(config: TrainConfig, model: DualNet) -> torch.optim.Optimizer:
    # fused: one kernel updates every parameter, where the default runs a dozen small ops per
    # parameter tensor; on 2 CPU cores that AdamW step took 8% of a width-16 training step.
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                           weight_decay=config.weight_decay, fused=True)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    if config.schedule == "onecycle":
        # OneCycle also cycles momentum (0.95 -> 0.85 -> 0.95) unless told not to. AdamW's beta1 keeps that
        # cycle, as the 1cycle policy has it; SGD keeps the momentum the config asks for.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps,
                                                   pct_start=ONECYCLE_WARMUP, cycle_momentum=config.optimizer != "sgd")
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def precision_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context ``fit`` trains and validates under: bf16 for ``precision`` "bf16", else off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def fit(config: TrainConfig | dict[str, Any], data: DualData,
        on_epoch: Callable[[EpochReport], None] | None = None,
        resume: dict[str, Any] | None = None) -> FitResult:
    """Train one model on ``data.train`` and score it on ``data.val`` after every epoch.

    Args:
        config: a ``TrainConfig`` or plain dict of its fields.
        data: the paired splits; the test split is never touched here. With an empty
            validation split, epochs report no ``val_*`` metrics.
        on_epoch: called after each epoch with the metrics and a way to build a checkpoint.
        resume: a checkpoint from ``EpochReport.state()``; training continues exactly
            as the unbroken run would have.

    Returns:
        A ``FitResult``. A NaN or inf training loss ends training early with status
        ``diverged``; that epoch reports 0 accuracy rather than NaN.

    Raises:
        ValueError: a bad config, or a checkpoint from a different config.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    keep_freed_memory()
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(f"precision: bf16 on a {device.type} without native bf16 runs several times slower than "
                      "fp32; use precision auto or fp32", stacklevel=2)
    torch.manual_seed(config.seed)
    model = build_model(config.arch, width=config.width, hidden=config.hidden, dropout=config.dropout,
                        depth=config.depth).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer, steps_per_epoch * config.epochs)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume is not None:
        if resume["config"] != config.to_dict():
            raise ValueError("checkpoint was written by a different config; refusing to resume from it")
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        history, start_epoch = list(resume["history"]), resume["epoch"]

    train = data.train.to(device)
    val = data.val.to(device)
    status = "completed"
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        order = data.train_order(config.seed, epoch).to(device)
        numbers = data.train_numbers(config.seed, epoch).to(device)
        loss_sum = torch.zeros((), device=device)
        model.train()
        for start in range(0, len(train), config.batch_size):
            idx = order[start:start + config.batch_size]
            batch_numbers = numbers[idx]
            batch_labels = train.labels[idx]
            with precision_autocast(precision, device):
                class_logits, sum_logits = model(train.images[idx], batch_numbers)
                loss = F.cross_entropy(class_logits, batch_labels) + \
                    F.cross_entropy(sum_logits, batch_labels + batch_numbers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * len(idx)
        train_s = time.perf_counter() - started
        train_loss = float(loss_sum) / len(train)
        diverged = not math.isfinite(train_loss)
        if diverged:
            status = "diverged"
        if not len(val):  # no validation split: a confirmation run on all training images
            scores = {}
        elif diverged:
            # The worst score on every metric, never NaN: Optuna refuses NaN, so a diverged trial would
            # otherwise be lost from the study instead of teaching the searcher to avoid its region.
            scores = {"loss": float("inf"), "class_acc": 0.0, "sum_acc": 0.0, "joint_acc": 0.0,
                      "class_correct": 0, "sum_correct": 0, "joint_correct": 0, "n": len(val)}
        else:
            with precision_autocast(precision, device):
                scores = evaluate(model, val)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss,
                   **{f"val_{k}": v for k, v in scores.items()},
                   "epoch_s": time.perf_counter() - started, "images_per_s": len(train) / train_s,
                   "precision": precision, "status": status}
        history.append(metrics)

        def state(epoch_done: int = epoch + 1, history_now: list = list(history)) -> dict[str, Any]:
            return {"epoch": epoch_done, "config": config.to_dict(), "history": history_now,
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    # Deep copies: the optimizer updates its state tensors in place after this epoch.
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                    "scheduler": copy.deepcopy(scheduler.state_dict()),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

        if on_epoch is not None:
            on_epoch(EpochReport(epoch + 1, metrics, state))
        if diverged:
            break
    return FitResult(status, history, model.to(memory_format=torch.contiguous_format).eval(), config)


def evaluate_split(model: DualNet, split: Split) -> dict[str, float]:
    """Score a trained model on one split (for example the test split, at confirmation time).

    Always in fp32, as ``DualNet.predict`` runs a saved model, so a test score is exactly what the
    saved model delivers. (Validation during ``fit`` follows the training precision, for speed.)

    Returns:
        ``loss``, ``class_acc``, ``sum_acc``, ``joint_acc`` and the correct counts.
    """
    device = next(model.parameters()).device
    return evaluate(model, split.to(device))
