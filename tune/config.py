"""Experiment files: YAML in, a validated ``Experiment`` out, or one ``ConfigError`` naming the key.

An experiment file looks like ``experiments/quick.yaml``. Everything is checked
before Ray starts, so a typo never costs a launched sweep.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dualnet.data import check_seed
from dualnet.files import load_yaml
from dualnet.models import ARCHS
from dualnet.train import ONECYCLE_WARMUP, TrainConfig

METRICS = ("val_joint_acc", "val_class_acc", "val_sum_acc", "val_loss")
# ASHA may rank trials at its rungs by the training loss too: it is not a search objective, only
# an early signal of which trials are learning.
RUNG_METRICS = (*METRICS, "train_loss")


def metric_mode(metric: str) -> str:
    """Return ``min`` for a loss and ``max`` for an accuracy: the direction that is better."""
    return "min" if metric.endswith("loss") else "max"

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
# Training settings the harness sets for every trial, so a sweep may not search them; each with its source.
HARNESS_KEYS = {"epochs": "every trial trains for the top-level epochs key",
                "threads": "the harness sets it from resources.cpu",
                "device": "the harness sets it from resources.gpu"}
SEARCHABLE = tuple(f.name for f in fields(TrainConfig) if f.name not in HARNESS_KEYS)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class ConfigError(ValueError):
    """An experiment file is wrong; ``str()`` is one line naming the file, the key and the fix."""


@dataclass
class Param:
    """One hyperparameter: a fixed ``value``, or a ``distribution`` over ``args``."""

    distribution: str | None
    args: list[Any]

    @property
    def fixed(self) -> bool:
        return self.distribution is None

    def to_yaml(self) -> Any:
        return self.args[0] if self.fixed else {self.distribution: list(self.args)}


@dataclass
class Searcher:
    type: str = "tpe"  # tpe | random | grid (every combination of the choice values)
    # 4, not 8: on benchmarks/sample_efficiency.py's wide space TPE reached its target in 65/44/46
    # epochs with 4 random start-up trials and never/64/never with 8 (same seeds and ASHA).
    n_startup_trials: int = 4
    multivariate: bool = False  # TPE models the parameters jointly instead of one by one
    constant_liar: bool = False  # TPE treats running trials as bad, so concurrent slots spread out


@dataclass
class Scheduler:
    type: str = "asha"  # asha | none
    # ASHA's first rung, in epochs; null: the first whole epoch after OneCycle's warm-up (see first_rung).
    grace_period: int | None = None
    reduction_factor: int = 3
    # What ASHA ranks trials by at each rung; null: the experiment's metric. The training loss, because
    # the joint accuracy sits near chance for the first epochs while the sum head starts to learn: on
    # benchmarks/sample_efficiency.py, seeds 0-9, TPE + ASHA reached a top-2.5% config in a median 72
    # epochs ranking by it, against 123.5 ranking by val_joint_acc (one run of each, benchmarks/README.md).
    metric: str | None = "train_loss"

    def first_rung(self, epochs: int) -> int:
        """Return the grace period ASHA gets for trials of ``epochs``: ``grace_period`` when set, else the
        first whole epoch after OneCycle's warm-up (30% of the epochs), at least 1.

        Before that epoch a OneCycle trial is still at a fraction of its learning rate, so a rung there
        stops it for a slow start that a constant-rate trial never has. With rungs at epoch 1, TPE then
        learned that OneCycle was bad and stalled on 5 of 10 seeds of benchmarks/sample_efficiency.py;
        with this rule (3 of 8 epochs) on 1 and 2 of 10 in two runs (benchmarks/README.md; README).
        """
        if self.grace_period is not None:
            return self.grace_period
        return max(1, math.ceil(round(ONECYCLE_WARMUP * epochs, 9)))  # round: 0.3 * 10 is 3.0000000000000004


@dataclass
class Resources:
    cpu: float = 1
    gpu: float = 0


@dataclass
class Data:
    dir: str | None = None
    download: bool = True
    val_size: int = 10_000
    train_subset: int | None = None
    seed: int = 0


@dataclass
class Experiment:
    name: str
    space: dict[str, Param]
    metric: str = "val_joint_acc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    epochs: int = 10
    time_budget_s: float | None = None
    # Epochs all trials may train together; once spent, no new trial starts (running ones finish).
    epoch_budget: int | None = None
    seed: int = 0
    max_failures: int = 2
    searcher: Searcher = field(default_factory=Searcher)
    scheduler: Scheduler = field(default_factory=Scheduler)
    resources: Resources = field(default_factory=Resources)
    data: Data = field(default_factory=Data)
    storage: str = "runs"

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` accepts back (written into each run folder)."""
        out = asdict(self)
        out["space"] = {key: param.to_yaml() for key, param in self.space.items()}
        return out


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(where: str, value: Any, kind: type, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_TYPE_NAMES[kind]}{' or null' if optional else ''}, got {value!r}")


def _section(where: str, raw: Any, cls: type) -> Any:
    """Validate a mapping against a dataclass's fields and types."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(known)}")
    return cls(**{key: _field_value(f"{where}.{key}", known[key], value) for key, value in raw.items()})


def _field_value(where: str, spec: Any, value: Any) -> Any:
    """Check ``value`` against a scalar dataclass field's type hint (``int``, ``float | None``, ...)."""
    hint = str(spec.type)
    kind = {"int": int, "float": float, "str": str, "bool": bool}[hint.split(" |")[0]]
    return _check_type(where, value, kind, optional="None" in hint)


def _param(key: str, raw: Any) -> Param:
    where = f"space.{key}"
    if key not in SEARCHABLE:
        hint = f" ({HARNESS_KEYS[key]})" if key in HARNESS_KEYS else ""
        raise ConfigError(f"{where}: unknown hyperparameter{hint}; searchable: {', '.join(SEARCHABLE)}")
    kind = type(getattr(TrainConfig, key))
    if not isinstance(raw, dict):
        _check_type(where, raw, kind)
        _check_value(where, key, raw)
        return Param(None, [raw])
    if len(raw) != 1:
        raise ConfigError(f"{where}: give exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {list(raw)}")
    (distribution, args), = raw.items()
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{distribution}: expected a non-empty list, got {args!r}")
    if distribution == "choice":
        for value in args:
            _check_type(where, value, kind)
            _check_value(where, key, value)
        if len(set(map(repr, args))) != len(args):
            raise ConfigError(f"{where}.choice: duplicate values in {args}")
        return Param("choice", list(args))
    if kind not in (int, float):
        raise ConfigError(f"{where}: {distribution} needs a numeric hyperparameter; use choice for {key}")
    if len(args) != 2:
        raise ConfigError(f"{where}.{distribution}: expected [low, high], got {args!r}")
    low, high = (_check_type(where, v, int if distribution == "int" else float) for v in args)
    if distribution == "int" and kind is not int:
        raise ConfigError(f"{where}: int distribution on a real-valued hyperparameter; use uniform")
    if distribution != "int" and kind is int:
        raise ConfigError(f"{where}: {distribution} on an integer hyperparameter; use int or choice")
    if not low < high:
        raise ConfigError(f"{where}.{distribution}: range [{low}, {high}] is empty or inverted; put the lower "
                          f"bound first")
    if distribution == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {low}")
    for value in (low, high):
        _check_value(where, key, value)
    return Param(distribution, [low, high])


def _check_value(where: str, key: str, value: Any) -> None:
    try:
        TrainConfig.from_dict({key: value})
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def from_dict(raw: Any) -> Experiment:
    """Validate plain data into an ``Experiment``.

    Raises:
        ConfigError: the first problem found, naming the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"top level: expected a mapping of experiment settings, got {type(raw).__name__}")
    known = {f.name: f for f in fields(Experiment)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{key}: unknown key; allowed: {', '.join(known)}")
    for key in ("name", "space"):
        if key not in raw:
            raise ConfigError(f"{key}: required key is missing")
    name = check_name(_check_type("name", raw["name"], str))
    space_raw = raw["space"]
    if not isinstance(space_raw, dict) or not space_raw:
        raise ConfigError("space: expected a non-empty mapping of hyperparameters")
    space = {key: _param(key, value) for key, value in space_raw.items()}
    values: dict[str, Any] = {"name": name, "space": space}
    sections = {"searcher": Searcher, "scheduler": Scheduler, "resources": Resources, "data": Data}
    for key in raw.keys() - {"name", "space"} - sections.keys():
        values[key] = _field_value(key, known[key], raw[key])
    for key, cls in sections.items():
        if key in raw:
            values[key] = _section(key, raw[key], cls)
    experiment = Experiment(**values)
    _check_ranges(experiment)
    return experiment


def _check_ranges(e: Experiment) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(e.metric in METRICS, f"metric: {e.metric!r} is not reported; use one of {', '.join(METRICS)}")
    need(e.mode in ("max", "min"), f"mode: {e.mode!r} must be max or min")
    expected_mode = metric_mode(e.metric)
    need(e.mode == expected_mode, f"mode: {e.metric} should be {expected_mode}imised; set mode: {expected_mode}")
    need(e.num_samples >= 1, f"num_samples: must be >= 1, got {e.num_samples}")
    need(e.max_concurrent >= 1, f"max_concurrent: must be >= 1, got {e.max_concurrent}")
    need(e.epochs >= 1, f"epochs: must be >= 1, got {e.epochs}")
    need(e.max_failures >= 0, f"max_failures: must be >= 0, got {e.max_failures}")
    need(e.time_budget_s is None or (e.time_budget_s > 0 and math.isfinite(e.time_budget_s)),
         f"time_budget_s: must be > 0 or null, got {e.time_budget_s}")
    need(e.epoch_budget is None or e.epoch_budget >= 1, f"epoch_budget: must be >= 1 or null, got {e.epoch_budget}")
    need(e.searcher.type in ("tpe", "random", "grid"),
         f"searcher.type: {e.searcher.type!r} must be tpe, random or grid")
    if e.searcher.type == "grid":
        ranged = [k for k, p in e.space.items() if p.distribution not in (None, "choice")]
        need(not ranged, f"space.{ranged[0] if ranged else ''}: a grid searcher takes only fixed values and "
             f"choice lists")
    need(e.searcher.n_startup_trials >= 1, "searcher.n_startup_trials: must be >= 1")
    need(e.scheduler.type in ("asha", "none"), f"scheduler.type: {e.scheduler.type!r} must be asha or none")
    grace = e.scheduler.grace_period
    need(grace is None or grace >= 1, f"scheduler.grace_period: must be >= 1 or null, got {grace}")
    need(e.scheduler.type != "asha" or grace is None or grace <= e.epochs,
         f"scheduler.grace_period: {grace} exceeds epochs ({e.epochs})")
    need(e.scheduler.metric is None or e.scheduler.metric in RUNG_METRICS,
         f"scheduler.metric: {e.scheduler.metric!r} is not reported; use one of {', '.join(RUNG_METRICS)} or null")
    need(e.scheduler.reduction_factor >= 2,
         f"scheduler.reduction_factor: must be >= 2, got {e.scheduler.reduction_factor}")
    need(e.resources.cpu > 0, f"resources.cpu: must be > 0, got {e.resources.cpu}")
    need(e.resources.gpu >= 0, f"resources.gpu: must be >= 0, got {e.resources.gpu}")
    need(e.resources.gpu <= 1 or float(e.resources.gpu).is_integer(),
         f"resources.gpu: a fraction must be below 1, got {e.resources.gpu}")
    need(e.data.val_size >= 1, f"data.val_size: must be >= 1, got {e.data.val_size}")
    need(e.data.train_subset is None or e.data.train_subset >= 1,
         f"data.train_subset: must be >= 1 or null, got {e.data.train_subset}")
    for key, seed in (("seed", e.seed), ("data.seed", e.data.seed)):
        try:
            check_seed(key, seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    need(bool(e.storage.strip()), "storage: must name a folder or a URI")
    if "arch" not in e.space:
        raise ConfigError(f"space.arch: required; give a design ({', '.join(ARCHS)}) or choice over them")


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and validate an experiment file; ``overrides`` (from flags) replace file values.

    Raises:
        ConfigError: unreadable file, bad YAML, or an invalid setting; one line, prefixed by the path.
    """
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read experiment file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (it is not UTF-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    try:
        if isinstance(raw, dict) and overrides:
            raw = merge_overrides(raw, overrides)
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def merge_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (``resources.cpu``) on top of raw experiment data."""
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        head, _, tail = dotted.partition(".")
        if tail:
            section = merged.get(head)
            merged[head] = {**(section if isinstance(section, dict) else {}), tail: value}
        else:
            merged[head] = value
    return merged


def check_name(name: str) -> str:
    """Return ``name`` if it is a safe run name (it can never escape the storage folder).

    Raises:
        ConfigError: names with path separators, ``..`` or odd characters.
    """
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"name: {name!r} must start with a letter or digit and hold only letters, digits, "
                          f"'_', '.' or '-' (no '/'), at most 100 characters")
    return name

