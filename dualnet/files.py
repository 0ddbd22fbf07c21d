"""Reading settings files, and writing result files so that a crash never leaves a half-written one."""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml


class _SettingsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``1.0e3`` as floats. YAML 1.1, which PyYAML
    follows, wants a dot and a signed exponent, so ``lr: 1e-3`` would arrive as the string "1e-3"."""


_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML like ``yaml.safe_load``, except that exponents read as in Python (``1e-3`` is a float).

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_SettingsLoader)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: what a
    one-line error can quote of a library's multi-line one."""
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, rename it over ``path``.

    The temporary name keeps the suffix (writers such as matplotlib pick the format from it) and is
    unique, so concurrent writers never share one. If the block raises, the temporary file is removed
    and ``path`` keeps its old contents, or stays absent.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
