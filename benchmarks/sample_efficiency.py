"""Sample efficiency: TPE + ASHA against random search without early stopping, at an equal budget of epochs.

Both run through ``python -m tune sweep`` on the same space, once per searcher seed, and so does a
third search, random sampling under the same ASHA, which splits TPE + ASHA's gain into what the early
stopping gives and what TPE adds (``--no-random-asha`` skips it). TPE + ASHA runs
with the harness's defaults (``tune.config.Searcher`` and ``Scheduler``), which is what an experiment
file that leaves them out gets; flags try other settings. Every epoch a trial trains counts against
the budget, whether or not ASHA later stops the trial. For each run the curve is the best validation
joint accuracy reported so far against the epochs spent so far.

The target is fixed from the random runs alone, before the two are compared: the 90th percentile of
the final accuracies of all random trials (each trained to the full budget), i.e. "find a top-10%
configuration of this space". Besides the epochs the random runs needed, the table gives what random
search needs in expectation: with a fraction p of its trials reaching the target, the first success
comes after a geometric number of trials (median ceil(ln 0.5 / ln(1 - p))).

The space is wide on purpose, as a user would set it before knowing good values: learning rates over
three decades, SGD or AdamW, constant or OneCycle schedules. The problem is shrunk (a 6k training
subset, 8 epochs per trial) so that 5 seeds x 3 searches fit in about 50 minutes on 2 cores.

    python benchmarks/sample_efficiency.py
    python benchmarks/sample_efficiency.py --seeds 3 --tpe-trials 20 --n-startup-trials 8 --out /tmp/se.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common import machine, run_sweep_command, write_report
from tune.config import Scheduler, Searcher

SPACE = {
    "arch": {"choice": ["late", "pixel"]},
    "lr": {"loguniform": [1.0e-4, 1.0e-1]},
    "optimizer": {"choice": ["adamw", "sgd"]},
    "schedule": {"choice": ["onecycle", "constant"]},
    "width": {"choice": [8, 16]},
    "hidden": {"choice": [128, 256]},
    "dropout": {"uniform": [0.0, 0.5]},
    "weight_decay": {"loguniform": [1.0e-6, 1.0e-1]},
    "batch_size": {"choice": [32, 64, 128]},
}


def best_so_far(trials: list[list[dict]], metric: str) -> list[tuple[int, float]]:
    """(epochs spent, best metric reported so far) after every report, in the order reports happened."""
    reports = sorted((r["timestamp"], r.get(metric, 0.0)) for rows in trials for r in rows)
    curve, best = [], 0.0
    for spent, (_, value) in enumerate(reports, start=1):
        best = max(best, value)
        curve.append((spent, best))
    return curve


def epochs_to(curve: list[tuple[int, float]], target: float, budget: int) -> int | None:
    """The epochs spent when the curve first reached ``target`` within ``budget``; None if it never did."""
    return next((spent for spent, best in curve if best >= target and spent <= budget), None)


def random_expected_epochs(finals: list[float], target: float, epochs: int) -> dict[str, float | None]:
    """What random search needs in expectation, trials drawn one at a time, each trained ``epochs``.

    Returns:
        ``p`` (fraction of ``finals`` at or above ``target``), and the median and mean epochs until the
        first such trial (None when no trial reached it).
    """
    p = sum(f >= target for f in finals) / len(finals)
    if p == 0:
        return {"p": 0.0, "median_epochs": None, "mean_epochs": None}
    median_trials = 1 if p == 1 else math.ceil(math.log(0.5) / math.log(1 - p))
    return {"p": p, "median_epochs": median_trials * epochs, "mean_epochs": epochs / p}


def plot(curves: dict[str, list[list[tuple[int, float]]]], target: float, budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, runs), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        for i, curve in enumerate(runs):
            xs, ys = zip(*[(s, 100 * b) for s, b in curve if s <= budget])
            ax.step(xs, ys, where="post", color=color, alpha=0.8, label=label if i == 0 else None)
    ax.axhline(100 * target, color="gray", linestyle="--", label=f"target {100 * target:.2f}%")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel("best validation joint accuracy so far (%)")
    low = min((100 * b for runs in curves.values() for c in runs for s, b in c if s >= 4 and b > 0), default=0.0)
    ax.set_ylim(max(0, low - 5), 100 * target + 3)
    ax.set_xlim(0, budget)
    ax.legend(loc="lower right")
    ax.set_title("Searches against epochs spent (one line per searcher seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="searcher seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=8, help="full budget of one trial")
    parser.add_argument("--budget", type=int, default=128, help="epochs per search (all trials together)")
    parser.add_argument("--train-subset", type=int, default=6000)
    parser.add_argument("--val-size", type=int, default=2000)
    parser.add_argument("--tpe-trials", type=int, help="trials TPE + ASHA may start (default: budget / 2)")
    parser.add_argument("--n-startup-trials", type=int, default=Searcher.n_startup_trials,
                        help=f"TPE's random start-up trials (default: the harness's, {Searcher.n_startup_trials})")
    parser.add_argument("--grace-period", type=int, default=Scheduler.grace_period, help="ASHA's first rung (default: "
                        f"the harness's, {Scheduler.grace_period})")
    parser.add_argument("--reduction-factor", type=int, default=Scheduler.reduction_factor,
                        help=f"ASHA keeps 1 in this many at each rung (default: the harness's, "
                        f"{Scheduler.reduction_factor})")
    parser.add_argument("--no-random-asha", action="store_true",
                        help="skip the third search, random sampling with the same ASHA (saves about a third)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_efficiency.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sample-efficiency-"))
    common: dict[str, Any] = {"max_concurrent": 2, "epochs": args.epochs, "resources": {"cpu": 1},
                              "data": {"train_subset": args.train_subset, "val_size": args.val_size},
                              "space": SPACE}
    # ASHA stops most trials early, so the same budget buys more trials; runs past the budget
    # are cut off when the curves are compared.
    asha = {"num_samples": args.tpe_trials or args.budget // 2,
            "scheduler": {"type": "asha", "grace_period": args.grace_period,
                          "reduction_factor": args.reduction_factor}}
    searches = {
        # Random search trains every trial to the full budget: budget / epochs trials.
        "random": {"num_samples": args.budget // args.epochs, "searcher": {"type": "random"},
                   "scheduler": {"type": "none"}},
        "tpe+asha": {**asha, "searcher": {"type": "tpe", "n_startup_trials": args.n_startup_trials}},
        # The same ASHA with random sampling: what the early stopping alone buys, and so what TPE adds.
        "random+asha": {**asha, "searcher": {"type": "random"}},
    }
    if args.no_random_asha:
        del searches["random+asha"]
    curves: dict[str, list[list[tuple[int, float]]]] = {name: [] for name in searches}
    random_finals: list[float] = []
    trials_run: dict[str, list[int]] = {name: [] for name in searches}
    for seed in range(args.seeds):
        for name, search in searches.items():
            experiment = {**common, **search, "name": f"{name.replace('+', '-')}-seed{seed}", "seed": seed}
            _, wall, trials = run_sweep_command(experiment, work)
            curves[name].append(best_so_far(trials, "val_joint_acc"))
            trials_run[name].append(len(trials))
            if name == "random":
                random_finals += [rows[-1].get("val_joint_acc", 0.0) for rows in trials]
            print(f"seed {seed} {name:<12} {len(trials):3d} trials, {curves[name][-1][-1][0]:3d} epochs, "
                  f"best {100 * curves[name][-1][-1][1]:.2f}%, {wall / 60:.1f} min", flush=True)

    target = float(np.quantile(random_finals, 0.9))
    results = {}
    for name, runs in curves.items():
        needed = [epochs_to(curve, target, args.budget) for curve in runs]
        at_budget = [max((b for s, b in curve if s <= args.budget), default=0.0) for curve in runs]
        results[name] = {"epochs_to_target": needed, "trials": trials_run[name],
                         "best_at_budget": at_budget, "mean_best_at_budget": statistics.mean(at_budget)}
    # A run that never reaches the target counts as needing more than the budget (reported as budget + 1).
    def typical(name: str) -> float:
        return statistics.median(n if n is not None else args.budget + 1 for n in results[name]["epochs_to_target"])

    expected = random_expected_epochs(random_finals, target, args.epochs)
    for name, row in results.items():
        if name != "random":
            row["median_epochs_over_random_runs"] = typical(name) / typical("random")
            row["median_epochs_over_random_expected"] = (typical(name) / expected["median_epochs"]
                                                         if expected["median_epochs"] else None)
    report = {"machine": machine(), "command": " ".join(["python benchmarks/sample_efficiency.py", *sys.argv[1:]]),
              "settings": vars(args) | {"out": str(args.out)}, "space": SPACE, "searches": searches,
              "target_val_joint_acc": target, "results": results, "random_expected": expected}
    print(f"\ntarget: {100 * target:.2f}% validation joint accuracy (90th percentile of "
          f"{len(random_finals)} fully trained random configs)")
    print(f"{'search':<18}{'epochs to target, per seed':>24}{'median':>8}{'best at budget (mean)':>24}")
    for name, row in results.items():
        needed = ", ".join(str(n) if n is not None else f">{args.budget}" for n in row["epochs_to_target"])
        print(f"{name:<18}{needed:>24}{typical(name):>8g}{100 * row['mean_best_at_budget']:>23.2f}%")
    if expected["median_epochs"]:
        print(f"{'random, expected':<18}{'p = ' + format(expected['p'], '.3f'):>24}{expected['median_epochs']:>8g}"
              f"{'(mean ' + format(expected['mean_epochs'], '.0f') + ')':>24}")
    tpe = searches["tpe+asha"]
    print(f"TPE + ASHA: {tpe['searcher']}, {tpe['scheduler']}")
    for name, row in results.items():
        if name != "random":
            vs_expected = row["median_epochs_over_random_expected"]
            print(f"{name} needs {row['median_epochs_over_random_runs']:.2f}x the epochs of these random runs to "
                  "reach the target (median over seeds)"
                  + (f", {vs_expected:.2f}x what random search needs in expectation" if vs_expected else ""))
    plot(curves, target, args.budget, args.out.with_suffix(".png"))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
