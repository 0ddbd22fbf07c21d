"""Memory and scaling: the same small sweep at 1, 2 and 4 concurrent trials, and on a local 2-node Ray cluster.

Each setup runs K trials x E epochs of one fixed recipe on all 60k training + validation images
through ``python -m tune sweep``. While it runs, every process on the machine is sampled every two
seconds (sparsely, since reading /proc/*/smaps costs CPU the trials would otherwise get):
  per trial     peak RSS, PSS (shared pages split between their users) and the part of RSS that is
                the object store's shared memory (/dev/shm), i.e. the dataset mapped zero-copy
  node          peak total PSS of every process this benchmark started: the sweep command and all
                Ray processes (PSS counts each shared page once), and /dev/shm in use
Throughput is trials per hour, end to end (launch to exit) and while trials ran (first trial start to
last report). Parallel efficiency = trials/hour / (cores used x trials/hour of one 1-core trial).

    python benchmarks/concurrency.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, at_least, command_line, machine, run_sweep_command, trial_start, write_report

TRIAL_PROCESS = "ray::ImplicitFunc"  # the name Ray gives a function trainable's worker

# (label, concurrent trials, CPUs per trial, Ray nodes)
SETUPS = [
    ("1 trial x 1 core", 1, 1.0, 1),
    ("1 trial x 2 cores", 1, 2.0, 1),
    ("2 trials x 1 core", 2, 1.0, 1),
    ("4 trials x 0.5 core", 4, 0.5, 1),
    ("2 nodes x 1 trial", 2, 1.0, 2),
]


def rollup(pid: str) -> dict[str, int]:
    """A process's memory totals in bytes from /proc/PID/smaps_rollup (Rss, Pss, ...)."""
    totals = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup_file:
        for line in rollup_file:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                totals[key] = 1024 * int(rest.split()[0])
    return totals


def descendants(root: int) -> list[str]:
    """PIDs of every process below ``root`` (Ray's processes are children of the driver or the test cluster)."""
    children: dict[str, list[str]] = {}
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = stat.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        children.setdefault(parent, []).append(pid)
    found, queue = [], [str(root)]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def shm_rss_kib(pid: str) -> int:
    """KiB of a process's resident memory that maps /dev/shm (Ray's object store)."""
    total, in_shm = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():  # a mapping header: "start-end perms offset dev inode path"
                in_shm = "/dev/shm/" in line
            elif in_shm and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


class MemorySampler:
    """Keeps the peak per-trial and whole-node memory seen across samples."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s, self.last_sample = interval_s, 0.0
        self.peak_node_pss = 0
        self.peak_shm_used = 0
        self.trial_peaks: dict[int, dict[str, int]] = {}

    def sample(self, _pid: int) -> None:
        if time.monotonic() - self.last_sample < self.interval_s:
            return
        self.last_sample = time.monotonic()
        node = 0
        for pid in descendants(os.getpid()):
            try:
                memory = rollup(pid)
                node += memory.get("Pss", 0)
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if cmdline.read().startswith(TRIAL_PROCESS.encode()):
                        peak = self.trial_peaks.setdefault(int(pid), {"rss": 0, "pss": 0, "shm": 0})
                        peak["rss"] = max(peak["rss"], memory.get("Rss", 0))
                        peak["pss"] = max(peak["pss"], memory.get("Pss", 0))
                        peak["shm"] = max(peak["shm"], 1024 * shm_rss_kib(pid))
            except OSError:  # the process ended, or is a kernel thread
                pass
        self.peak_node_pss = max(self.peak_node_pss, node)
        self.peak_shm_used = max(self.peak_shm_used, shutil.disk_usage("/dev/shm").used)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=at_least(1), default=4, help="trials per setup (default: 4)")
    parser.add_argument("--epochs", type=at_least(1), default=1, help="epochs per trial (default: 1)")
    parser.add_argument("--train-subset", type=at_least(1), default=None, help="training images (default all 50k)")
    parser.add_argument("--out", type=Path, default=RESULTS / "concurrency.json",
                        help="JSON to write (default: benchmarks/results/concurrency.json)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="concurrency-"))  # removed at the end; a failed sweep's error names it
    dataset_mib = ((args.train_subset or 50000) + 10000) * 28 * 28 / 2 ** 20  # uint8 training + validation images
    rows = []
    for label, concurrent, cpus, nodes in SETUPS:
        experiment = {"name": f"c{concurrent}-cpu{cpus:g}-n{nodes}", "num_samples": args.trials,
                      "max_concurrent": concurrent, "epochs": args.epochs, "searcher": {"type": "random"},
                      "scheduler": {"type": "none"}, "resources": {"cpu": cpus}, "data": {"val_size": 10000, "train_subset": args.train_subset},
                      "space": {"arch": "late", "width": 16, "hidden": 256, "batch_size": 128, "lr": 5e-3}}
        sampler = MemorySampler()
        cluster = None
        extra: tuple[str, ...] = ()
        if nodes > 1:
            # Ray's own test helper: separate raylets and object stores on this machine, as on real nodes.
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            extra = ("--address", cluster.address)
        try:
            _, wall, trials = run_sweep_command(experiment, work, extra, while_running=sampler.sample)
        finally:
            if cluster is not None:
                cluster.shutdown()
        running = max(rows_[-1]["timestamp"] for rows_ in trials) - min(trial_start(rows_) for rows_ in trials)
        peaks = list(sampler.trial_peaks.values())
        rows.append({
            "setup": label, "concurrent": concurrent, "cpus_per_trial": cpus, "nodes": nodes,
            "cores_used": min(concurrent * cpus, os.cpu_count() or 1), "trials": len(trials),
            "wall_s": wall, "trials_per_hour": 3600 * len(trials) / wall,
            "trials_per_hour_running": 3600 * len(trials) / running,
            "trial_peak_rss_mib": max(p["rss"] for p in peaks) / 2 ** 20,
            "trial_peak_pss_mib": max(p["pss"] for p in peaks) / 2 ** 20,
            "trial_shared_dataset_mib": max(p["shm"] for p in peaks) / 2 ** 20,
            "node_peak_pss_mib": sampler.peak_node_pss / 2 ** 20,
            "object_store_shm_mib": sampler.peak_shm_used / 2 ** 20,
        })
        print(f"{label}: {len(trials)} trials in {wall:.0f} s", flush=True)
    shutil.rmtree(work)
    single = next(r for r in rows if r["concurrent"] == 1 and r["cores_used"] == 1)
    for row in rows:
        for key in ("trials_per_hour", "trials_per_hour_running"):
            row[key.replace("trials_per_hour", "efficiency")] = row[key] / (row["cores_used"] * single[key])

    print(f"\ndataset: {dataset_mib:.0f} MiB of uint8 images; {args.trials} trials x {args.epochs} epoch(s) per setup")
    print(f"{'setup':<22}{'trials/h':>9}{'(running)':>10}{'effic.':>8}{'trial RSS':>11}{'trial PSS':>11}"
          f"{'shared data':>13}{'node PSS':>10}{'/dev/shm':>10}")
    for r in rows:
        print(f"{r['setup']:<22}{r['trials_per_hour']:>9.0f}{r['trials_per_hour_running']:>10.0f}"
              f"{r['efficiency_running']:>8.2f}{r['trial_peak_rss_mib']:>8.0f} MiB{r['trial_peak_pss_mib']:>8.0f} MiB"
              f"{r['trial_shared_dataset_mib']:>10.0f} MiB{r['node_peak_pss_mib']:>7.0f} MiB"
              f"{r['object_store_shm_mib']:>7.0f} MiB")
    write_report(args.out, {"machine": machine(), "command": command_line(),
                            "trials": args.trials, "epochs": args.epochs, "train_subset": args.train_subset,
                            "dataset_mib": dataset_mib,
                            "setups": rows})


if __name__ == "__main__":
    main()
