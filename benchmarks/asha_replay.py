"""Replay early-stopping rules on the recorded histories of fully trained random trials.

The random searches of ``sample_efficiency.py`` train every trial to the full budget, so each
trial's per-epoch history says what any early stop would have seen at any rung. This script draws
trials from that pool at random (with replacement) and replays, on two slots that each train one
epoch per time step, the rules below; it trains nothing and takes seconds. For each rule it gives
the median epochs spent until a reported validation joint accuracy first reaches each target (the
same targets as ``sample_efficiency.py``: quantiles of the pool's final accuracies).

- ``none``: every trial runs to the full budget (random search).
- ``stop``: Ray's ``ASHAScheduler``, which the harness uses. A trial reaching a rung is stopped
  if it ranks below the rung's top 1/reduction_factor among the results recorded there so far;
  the first trial at a rung always goes on.
- ``promote``: the promotion form of ASHA (Li et al., 2020). Trials pause at each rung, and a
  free slot resumes the best paused trial that ranks in the rung's top 1/reduction_factor, or
  else starts a new trial.

Each rule ranks rungs by ``train_loss`` (the harness's default) or by ``val_joint_acc``. What the
replay leaves out: trials train at different speeds (batch size, width), and TPE; the searcher
here is random sampling.

It also counts how many of the pool's top-10% trials survive a first cut that keeps the best third
after one epoch, ranked by each metric: how well each metric separates good configs early.

    python benchmarks/asha_replay.py /tmp/sample-efficiency-A /tmp/sample-efficiency-B
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, at_least, command_line, machine, quantile_arg, write_report
from sample_efficiency import load_searches, random_expected_epochs, random_finals
from tune.config import Scheduler

RULES = [("none", None), ("stop", "train_loss"), ("stop", "val_joint_acc"), ("promote", "train_loss"),
         ("promote", "val_joint_acc")]


def rank_value(history: list[dict], epoch: int, metric: str) -> float:
    """Higher is better at the rung: accuracy as reported, the training loss negated."""
    value = history[epoch - 1][metric]
    return -value if metric == "train_loss" else value


def replay(pool: list[list[dict]], rule: str, metric: str | None, rungs: list[int], reduction_factor: int,
           targets: list[float], budget: int, rng: random.Random, slots: int = 2) -> list[int | None]:
    """One search under ``rule``; returns the epochs spent when each target was first reached (None: not
    within ``budget``)."""
    epochs = len(pool[0])
    recorded: dict[int, dict[int, float]] = {rung: {} for rung in rungs}  # rung -> {job: rank value}
    promoted: dict[int, set[int]] = {rung: set() for rung in rungs}
    jobs: list[int] = []  # job number -> index of its trial in the pool
    running: list[list[int] | None] = [None] * slots  # per slot: [job, next epoch, pause after this epoch]
    reached: list[int | None] = [None] * len(targets)
    spent, best = 0, 0.0

    def next_job() -> list[int]:
        if rule == "promote":
            for k in reversed(range(len(rungs))):
                rung, results = rungs[k], recorded[rungs[k]]
                top = sorted(results, key=results.get, reverse=True)[:len(results) // reduction_factor]
                waiting = [job for job in top if job not in promoted[rung]]
                if waiting:
                    promoted[rung].add(waiting[0])
                    return [waiting[0], rung + 1, rungs[k + 1] if k + 1 < len(rungs) else epochs]
        jobs.append(rng.randrange(len(pool)))
        return [len(jobs) - 1, 1, rungs[0] if rule == "promote" else epochs]

    while spent < budget and None in reached:
        for slot in range(slots):
            if running[slot] is None:
                running[slot] = next_job()
            job, epoch, pause_after = running[slot]
            history = pool[jobs[job]]
            spent += 1
            best = max(best, history[epoch - 1]["val_joint_acc"])
            for i, target in enumerate(targets):
                if reached[i] is None and best >= target:
                    reached[i] = spent
            stop = epoch >= pause_after
            if epoch in recorded and rule != "none":
                value = rank_value(history, epoch, metric)
                results = recorded[epoch]
                if rule == "stop" and results:
                    # Ray's rule: below the (1 - 1/rf) quantile of what the rung has recorded so far.
                    stop = stop or value < np.nanpercentile(list(results.values()), (1 - 1 / reduction_factor) * 100)
                results[job] = value
            running[slot] = None if stop else [job, epoch + 1, pause_after]
    return reached


def first_cut_keeps(pool: list[list[dict]], metric: str, top: set[int]) -> int:
    """How many of the trials in ``top`` rank in the best third by ``metric`` after one epoch."""
    order = sorted(range(len(pool)), key=lambda i: rank_value(pool[i], 1, metric), reverse=True)
    return len(top & set(order[:len(pool) // 3]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("from_dirs", type=Path, nargs="+", metavar="DIR",
                        help="work folders of sample_efficiency.py runs (each run prints its own first)")
    parser.add_argument("--grace-period", type=at_least(1), help="the first rung (default: the harness's, the first "
                        "epoch after OneCycle's warm-up)")
    parser.add_argument("--reduction-factor", type=at_least(2), default=3, help="keep 1 in this many at each rung "
                        "(default: 3)")
    parser.add_argument("--draws", type=at_least(1), default=2000, help="searches replayed per rule (default: 2000)")
    parser.add_argument("--budget", type=at_least(1), default=400, help="epochs per replayed search (default: 400)")
    parser.add_argument("--targets", type=quantile_arg, nargs="+", default=[0.9, 0.95, 0.975], metavar="QUANTILE",
                        help="targets as quantiles of the pool's final accuracies (default: 0.9 0.95 0.975)")
    parser.add_argument("--out", type=Path, default=RESULTS / "asha_replay.json",
                        help="JSON to write (default: benchmarks/results/asha_replay.json)")
    args = parser.parse_args()
    missing = [str(d) for d in args.from_dirs if not d.is_dir()]
    if missing:
        parser.error(f"{', '.join(missing)} is not a folder")
    try:
        _, runs, epochs = load_searches(args.from_dirs)
    except ValueError as exc:
        parser.error(str(exc))
    pool = [rows for trials in runs["random"] for rows in trials if len(rows) == epochs]
    finals = random_finals(runs)
    rungs = []
    rung = Scheduler(grace_period=args.grace_period).first_rung(epochs)
    while rung < epochs:
        rungs.append(rung)
        rung *= args.reduction_factor
    targets = [float(np.quantile(finals, q)) for q in sorted(args.targets)]

    print(f"{len(pool)} fully trained random trials of {epochs} epochs; rungs at {rungs}, reduction factor "
          f"{args.reduction_factor}; {args.draws} replayed searches per rule")
    header = "".join(f"{'top ' + format(100 * (1 - q), 'g') + '%: ' + format(100 * t, '.2f') + '%':>22}"
                     for q, t in zip(sorted(args.targets), targets))
    print(f"\nmedian epochs to reach each target (x random search's expectation)\n{'rule':<24}{header}")
    expected = [random_expected_epochs(finals, t, epochs)["median_epochs"] for t in targets]
    results: list[dict[str, Any]] = []
    for rule, metric in RULES:
        rng = random.Random(0)
        reached = [replay(pool, rule, metric, rungs, args.reduction_factor, targets, args.budget, rng)
                   for _ in range(args.draws)]
        medians = [statistics.median(r[i] if r[i] is not None else args.budget + 1 for r in reached)
                   for i in range(len(targets))]
        name = rule if metric is None else f"{rule}, by {metric}"
        cells = "".join(f"{f'{m:g} ({m / e:.2f}x)' if e else f'{m:g}':>22}" for m, e in zip(medians, expected))
        print(f"{name:<24}{cells}")
        results.append({"rule": rule, "rung_metric": metric, "median_epochs": medians,
                        "over_random_expected": [m / e if e else None for m, e in zip(medians, expected)]})
    print(f"{'random, expected':<24}" + "".join(f"{e:>22}" for e in expected))

    top = {i for i, rows in enumerate(pool) if rows[-1]["val_joint_acc"] >= targets[0]}
    keeps = {metric: first_cut_keeps(pool, metric, top) for metric in ("train_loss", "val_joint_acc")}
    print(f"\nA first cut to the best third after 1 epoch keeps, of the {len(top)} trials that end in the top "
          f"{100 * (1 - sorted(args.targets)[0]):g}%: " + ", ".join(f"{k} by {m}" for m, k in keeps.items()))
    write_report(args.out, {
        "machine": machine(), "command": command_line(),
        "pool_trials": len(pool), "epochs": epochs, "rungs": rungs, "reduction_factor": args.reduction_factor,
        "draws": args.draws, "budget": args.budget, "targets": targets, "random_expected_median_epochs": expected,
        "rules": results, "first_cut": {"top_trials": len(top), "kept": keeps}})


if __name__ == "__main__":
    main()
