"""What the sweep benchmarks share: run ``python -m tune sweep`` on a generated experiment, read its trials."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from dualnet.files import write_atomic

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # where each script writes its JSON unless told otherwise


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, so a bad flag is refused before any work starts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def quantile_arg(text: str) -> float:
    """An argparse type: a quantile strictly between 0 and 1 (a target as a share of random configs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a quantile must lie strictly between 0 and 1, got {value:g}")
    return value


def command_line() -> str:
    """The command that made a result, as typed from the repository root; stored with the result."""
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the hardware and software a result was measured on.

    It says whether the CPU has native bf16, because that decides what dualnet's default
    precision trains in there (``dualnet.train.pick_precision``).
    """
    import torch

    from dualnet.train import native_bf16

    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return (f"{cpu_model()} ({platform.machine()}, {bf16}), {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM, "
            f"torch {torch.__version__}, python {platform.python_version()}")


def run_sweep_command(experiment: dict[str, Any], work: Path, args: tuple[str, ...] = (),
              while_running: Callable[[int], None] | None = None) -> tuple[float, float, list[list[dict]]]:
    """Run ``python -m tune sweep`` on ``experiment`` (an experiment-file mapping) as a user would.

    ``experiment["storage"]`` is set to ``work/runs``. ``while_running(pid)`` is called about
    twice a second while the sweep runs (memory sampling).

    Returns:
        (launch time as ``time.time()``, wall seconds of the command, each trial's reported results).

    Raises:
        SystemExit: the sweep failed; its own error is already on stderr, and this one line adds where its
            run folder is.
    """
    work.mkdir(parents=True, exist_ok=True)
    experiment = {**experiment, "storage": str(work / "runs")}
    path = work / f"{experiment['name']}.yaml"
    path.write_text(yaml.safe_dump(experiment))
    launched_at, started = time.time(), time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "tune", "sweep", str(path), "--quiet", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL)
    while process.poll() is None:
        if while_running is not None:
            while_running(process.pid)
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"error: python -m tune sweep {path} failed with exit code {process.returncode}; "
                         f"its run folder is {work / 'runs' / experiment['name']}")
    return launched_at, wall, read_trials(work / "runs" / experiment["name"])


def read_trials(run: Path) -> list[list[dict]]:
    """Each trial's reported results, from the run folder ``storage/name`` of a finished sweep."""
    trials = [[json.loads(line) for line in result.read_text().splitlines()]
              for result in sorted(run.glob("*/result.json"))]
    return [t for t in trials if t]


def trial_start(rows: list[dict]) -> float:
    """Wall-clock time a trial's training began (its first report minus that report's duration)."""
    return rows[0]["timestamp"] - rows[0]["time_this_iter_s"]


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=2))
    print(f"wrote {path}")
