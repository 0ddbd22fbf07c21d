"""Sample efficiency: TPE + ASHA against random search without early stopping, at an equal budget of epochs.

Both run through ``python -m tune sweep`` on the same space, once per searcher seed, and so does a
third search, random sampling under the same ASHA, which splits TPE + ASHA's gain into what the early
stopping gives and what TPE adds (``--no-random-asha`` skips it). TPE + ASHA runs
with the harness's defaults (``tune.config.Searcher`` and ``Scheduler``), which is what an experiment
file that leaves them out gets; flags try other settings. Every epoch a trial trains counts against
the budget, whether or not ASHA later stops the trial; the ASHA searches run with the sweep's
``epoch_budget`` set to it, so they start no trial once it is spent. For each run the curve is the
best validation joint accuracy reported so far against the epochs spent so far.

The targets are fixed from the random runs alone, before the searches are compared: quantiles of the
final accuracies of all random trials (each trained to the full budget). The defaults, 0.9, 0.95 and
0.975, ask for a top-10%, top-5% and top-2.5% configuration of this space. Several, because how much
a searcher saves depends on how rare the target is: no search reaches any target in fewer epochs than
one full trial plus what the other slot spends meanwhile (about 16 here), so against a common target
that random search finds in a few trials no searcher can be 3x faster. Besides the epochs the random
runs needed, each table gives what random search needs in expectation: with a fraction p of its
trials reaching the target, the first success comes after a geometric number of trials (median
ceil(ln 0.5 / ln(1 - p))), with the range that median spans over the 95% interval of p.

The space is wide on purpose, as a user would set it before knowing good values: learning rates over
three decades, SGD or AdamW, constant or OneCycle schedules. The problem is shrunk (a 6k training
subset, 8 epochs per trial) so that 5 seeds x 3 searches fit in about 40 minutes on 2 cores.

    python benchmarks/sample_efficiency.py
    python benchmarks/sample_efficiency.py --seeds 3 --tpe-trials 20 --n-startup-trials 8 --out /tmp/se.json
    python benchmarks/sample_efficiency.py --from /tmp/sample-efficiency-A /tmp/sample-efficiency-B \\
        --targets 0.8 0.99 --out /tmp/se.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

import yaml

from common import RESULTS, at_least, command_line, machine, quantile_arg, read_trials, run_sweep_command, write_report
from tune.config import RUNG_METRICS, Scheduler, Searcher

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


def _median_trials(p: float) -> int:
    """Median of the geometric number of trials until the first success, each succeeding with ``p``."""
    return 1 if p >= 1 else math.ceil(math.log(0.5) / math.log(1 - p))


def random_expected_epochs(finals: list[float], target: float, epochs: int) -> dict[str, Any]:
    """What random search needs in expectation, trials drawn one at a time, each trained ``epochs``.

    Returns:
        ``successes`` (trials in ``finals`` at or above ``target``) and ``p``, their fraction; the median
        and mean epochs until the first such trial (None when no trial reached it); and
        ``median_epochs_95``, the range of that median over the 95% (Clopper-Pearson) interval of ``p``,
        since a rare target's ``p`` rests on a few trials.
    """
    successes, n = sum(f >= target for f in finals), len(finals)
    p = successes / n
    low_p = stats.beta.ppf(0.025, successes, n - successes + 1) if successes else 0.0
    high_p = stats.beta.ppf(0.975, successes + 1, n - successes) if successes < n else 1.0
    if p == 0:
        return {"successes": 0, "p": 0.0, "median_epochs": None, "mean_epochs": None,
                "median_epochs_95": [_median_trials(high_p) * epochs, None]}
    return {"successes": successes, "p": p, "median_epochs": _median_trials(p) * epochs, "mean_epochs": epochs / p,
            "median_epochs_95": [_median_trials(high_p) * epochs, _median_trials(low_p) * epochs]}


def plot(curves: dict[str, list[list[tuple[int, float]]]], targets: list[float], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, runs), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green")):
        for i, curve in enumerate(runs):
            xs, ys = zip(*[(s, 100 * b) for s, b in curve if s <= budget])
            ax.step(xs, ys, where="post", color=color, alpha=0.8, label=label if i == 0 else None)
    for target, style in zip(targets, ("--", "-.", ":", (0, (1, 4)))):
        ax.axhline(100 * target, color="gray", linestyle=style, label=f"target {100 * target:.2f}%")
    ax.set_xlabel("epochs spent (all trials)")
    ax.set_ylabel("best validation joint accuracy so far (%)")
    low = min((100 * b for runs in curves.values() for c in runs for s, b in c if s >= 4 and b > 0), default=0.0)
    ax.set_ylim(max(0, low - 5), 100 * max(targets) + 3)
    ax.set_xlim(0, budget)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("Searches against epochs spent (one line per searcher seed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Folder-name prefix of each search's runs; also how ``--from`` recognises them.
FOLDERS = {"random": "random", "tpe+asha": "tpe-asha", "random+asha": "random-asha"}


def run_searches(searches: dict[str, dict], common: dict[str, Any], seeds: range,
                 work: Path) -> dict[str, list[list[list[dict]]]]:
    """Run every search once per searcher seed through ``python -m tune sweep``.

    Returns:
        For each search, per seed, each trial's reported results.
    """
    runs: dict[str, list[list[list[dict]]]] = {name: [] for name in searches}
    for seed in seeds:
        for name, search in searches.items():
            experiment = {**common, **search, "name": f"{FOLDERS[name]}-seed{seed}", "seed": seed}
            _, wall, trials = run_sweep_command(experiment, work)
            runs[name].append(trials)
            curve = best_so_far(trials, "val_joint_acc")
            print(f"seed {seed} {name:<12} {len(trials):3d} trials, {curve[-1][0]:3d} epochs, "
                  f"best {100 * curve[-1][1]:.2f}%, {wall / 60:.1f} min", flush=True)
    return runs


def load_searches(works: list[Path]) -> tuple[dict[str, dict], dict[str, list[list[list[dict]]]], int]:
    """Read back finished runs' folders (each run prints its own), pooling their seeds.

    Returns:
        (each search's settings, its trials per seed, the epochs of one trial).

    Raises:
        ValueError: a folder holds no runs of this benchmark, a run is unreadable or has no trials (an
            interrupted run: rerun its seed, or leave its files out), or the runs' settings differ.
    """
    by_folder = {folder: name for name, folder in FOLDERS.items()}
    searches: dict[str, dict] = {}
    runs: dict[str, list[list[list[dict]]]] = {}
    epochs: set[int] = set()
    for work in works:
        files = sorted((f for f in work.glob("*-seed*.yaml") if f.stem.rsplit("-seed", 1)[1].isdigit()),
                       key=lambda f: int(f.stem.rsplit("-seed", 1)[1]))
        if not any(file.stem.startswith("random-seed") for file in files):
            raise ValueError(f"{work}: no random-seedN.yaml of this benchmark there")
        for file in files:
            name = by_folder.get(file.stem.rsplit("-seed", 1)[0])
            if name is None:
                continue
            try:
                experiment = yaml.safe_load(file.read_text())
                search = {key: experiment[key] for key in ("num_samples", "searcher", "scheduler")}
                epochs.add(experiment["epochs"])
                run = work / "runs" / experiment["name"]
            except KeyError as exc:
                raise ValueError(f"{file}: lacks the key {exc}; not an experiment file this benchmark wrote") from None
            except (OSError, yaml.YAMLError, TypeError) as exc:
                reason = getattr(exc, "problem", None) or exc  # a YAML error's one-line gist
                raise ValueError(f"{file}: not an experiment file this benchmark wrote ({reason})") from None
            trials = read_trials(run)
            if not trials:
                raise ValueError(f"{run}: no trial results; the run was interrupted or failed (rerun that seed, "
                                 f"or move {file.name} out of the folder)")
            if searches.setdefault(name, search) != search:
                raise ValueError(f"{file} ran {name} as {search}, another run as {searches[name]}; "
                                 "only runs of the same searches pool")
            runs.setdefault(name, []).append(trials)
    if len(epochs) != 1:
        raise ValueError(f"the runs trained trials for different epochs ({sorted(epochs)}); they do not pool")
    order = [name for name in FOLDERS if name in searches]
    return {name: searches[name] for name in order}, {name: runs[name] for name in order}, epochs.pop()


def random_finals(runs: dict[str, list[list[list[dict]]]]) -> list[float]:
    """The final validation joint accuracy of every random-search trial, each trained to the full epochs."""
    return [rows[-1].get("val_joint_acc", 0.0) for trials in runs["random"] for rows in trials]


def compare(curves: dict[str, list[list[tuple[int, float]]]], finals: list[float], quantiles: list[float],
            epochs: int, budget: int) -> list[dict[str, Any]]:
    """Epochs each search needed to reach each target, against random search's.

    Args:
        curves: per search, per seed, the ``best_so_far`` curve.
        finals: ``random_finals`` of the same runs; each target is one of their quantiles, so it is
            fixed from the random runs alone.

    Returns:
        One row per target. A run that never reaches a target within ``budget`` counts as
        ``budget + 1`` in the medians.
    """
    rows = []
    for quantile in quantiles:
        target = float(np.quantile(finals, quantile))
        expected = random_expected_epochs(finals, target, epochs)
        needed = {name: [epochs_to(curve, target, budget) for curve in per_seed] for name, per_seed in curves.items()}
        medians = {name: statistics.median(n if n is not None else budget + 1 for n in per_seed)
                   for name, per_seed in needed.items()}
        searches = {}
        for name in curves:
            row: dict[str, Any] = {"epochs_to_target": needed[name], "median": medians[name]}
            if name != "random":
                # Against random runs that never got there, a ratio says nothing.
                row["over_random_runs"] = medians[name] / medians["random"] if medians["random"] <= budget else None
                row["over_random_expected"] = (medians[name] / expected["median_epochs"]
                                               if expected["median_epochs"] else None)
            searches[name] = row
        rows.append({"quantile": quantile, "val_joint_acc": target, "random_expected": expected,
                     "searches": searches})
    return rows


def print_tables(targets: list[dict[str, Any]], results: dict[str, dict], finals: list[float], budget: int) -> None:
    for row in targets:
        expected = row["random_expected"]
        print(f"\ntarget {100 * row['val_joint_acc']:.2f}% (top {100 * (1 - row['quantile']):.1f}% of random configs: "
              f"{expected['successes']} of {len(finals)} fully trained random trials reach it)")
        print(f"  {'search':<14}{'epochs to target, per seed':>30}{'median':>8}{'x random runs':>15}"
              f"{'x random expected':>19}")
        for name, search in row["searches"].items():
            needed = ", ".join(str(n) if n is not None else f">{budget}" for n in search["epochs_to_target"])
            ratios = ""
            if name != "random":
                vs_expected = search["over_random_expected"]
                vs_runs = search["over_random_runs"]
                ratios = ((f"{vs_runs:>14.2f}x" if vs_runs is not None else f"{'-':>15}")
                          + (f"{vs_expected:>18.2f}x" if vs_expected is not None else ""))
            print(f"  {name:<14}{needed:>30}{search['median']:>8g}{ratios}")
        if expected["median_epochs"]:
            low, high = expected["median_epochs_95"]
            print(f"  {'random, expected':<14}{'p = ' + format(expected['p'], '.3f'):>30}"
                  f"{expected['median_epochs']:>8g}   (mean {expected['mean_epochs']:.0f}; median {low}-{high} "
                  "over the 95% interval of p)")
    print(f"\n{'search':<14}{'trials':>8}{'best at budget (mean)':>24}")
    for name, row in results.items():
        print(f"{name:<14}{sum(row['trials']):>8}{100 * row['mean_best_at_budget']:>23.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=at_least(1), default=5, help="how many searcher seeds (default: 5)")
    parser.add_argument("--first-seed", type=at_least(0), default=0, help="seeds run from this one up (default: 0); "
                        "runs of other seeds can then be pooled with --from")
    parser.add_argument("--epochs", type=at_least(1), default=8, help="full budget of one trial (default: 8)")
    parser.add_argument("--budget", type=at_least(1), default=128,
                        help="epochs per search, all trials together; at least --epochs (default: 128)")
    parser.add_argument("--train-subset", type=at_least(1), default=6000,
                        help="training images each trial trains on (default: 6000)")
    parser.add_argument("--val-size", type=at_least(1), default=2000,
                        help="validation images, held out of the 60k (default: 2000)")
    parser.add_argument("--tpe-trials", type=at_least(1), help="trials an ASHA search may start (default: "
                        "as many as the budget has epochs; the epoch budget ends it first)")
    parser.add_argument("--n-startup-trials", type=at_least(0), default=Searcher.n_startup_trials,
                        help=f"TPE's random start-up trials (default: the harness's, {Searcher.n_startup_trials})")
    parser.add_argument("--grace-period", type=at_least(1), default=Scheduler.grace_period, help="ASHA's first rung (default: "
                        "the harness's: the first epoch after OneCycle's warm-up, 3 of 8)")
    parser.add_argument("--reduction-factor", type=at_least(2), default=Scheduler.reduction_factor,
                        help=f"ASHA keeps 1 in this many at each rung (default: the harness's, "
                        f"{Scheduler.reduction_factor})")
    parser.add_argument("--rung-metric", default=Scheduler.metric, choices=RUNG_METRICS,
                        help=f"what ASHA ranks trials by at each rung (default: the harness's, {Scheduler.metric}; "
                        "'val_joint_acc' was the default before)")
    parser.add_argument("--no-random-asha", action="store_true",
                        help="skip the third search, random sampling with the same ASHA (saves about a third)")
    parser.add_argument("--targets", type=quantile_arg, nargs="+", default=[0.9, 0.95, 0.975], metavar="QUANTILE",
                        help="targets, as quantiles of the random trials' final accuracies (default: 0.9 0.95 0.975, "
                        "a top-10%%, top-5%% and top-2.5%% config)")
    parser.add_argument("--from", dest="from_dirs", type=Path, nargs="+", metavar="DIR",
                        help="run nothing: re-analyse the work folders of earlier runs (each run prints its own "
                        "first), pooling their seeds; the search flags, --epochs and --budget are then read "
                        "from their files")
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_efficiency.json",
                        help="JSON to write, and the plot beside it as .png (default: "
                        "benchmarks/results/sample_efficiency.json)")
    args = parser.parse_args()
    if args.budget < args.epochs:
        parser.error(f"--budget {args.budget} is less than one trial's --epochs {args.epochs}")
    if args.from_dirs:
        missing = [str(d) for d in args.from_dirs if not d.is_dir()]
        if missing:
            parser.error(f"--from: {', '.join(missing)} is not a folder")
        try:
            searches, runs, epochs = load_searches(args.from_dirs)
        except ValueError as exc:
            parser.error(f"--from: {exc}")
        # What those runs had, in place of the flags: random search trains all its trials to the full epochs.
        settings = {"seeds": len(runs["random"]), "epochs": epochs,
                    "budget": searches["random"]["num_samples"] * epochs, "targets": args.targets,
                    "from_dirs": [str(d) for d in args.from_dirs]}
        args.epochs, args.budget = settings["epochs"], settings["budget"]
    else:
        settings = vars(args) | {"out": str(args.out)}
        work = Path(tempfile.mkdtemp(prefix="sample-efficiency-"))
        print(f"work folder: {work} (re-analyse it with --from)", flush=True)
        common: dict[str, Any] = {"max_concurrent": 2, "epochs": args.epochs, "resources": {"cpu": 1},
                                  "data": {"train_subset": args.train_subset, "val_size": args.val_size},
                                  "space": SPACE}
        # ASHA stops most trials early, so the same budget buys more trials. The sweep's epoch budget
        # stops it starting trials once the budget is spent; the epochs its last running trials add
        # are cut off when the curves are compared.
        asha = {"num_samples": args.tpe_trials or args.budget, "epoch_budget": args.budget,
                "scheduler": {"type": "asha", "grace_period": args.grace_period,
                              "reduction_factor": args.reduction_factor, "metric": args.rung_metric}}
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
        runs = run_searches(searches, common, range(args.first_seed, args.first_seed + args.seeds), work)

    curves = {name: [best_so_far(trials, "val_joint_acc") for trials in per_seed] for name, per_seed in runs.items()}
    finals = random_finals(runs)
    targets = compare(curves, finals, sorted(args.targets), args.epochs, args.budget)
    results = {}
    for name, per_seed in curves.items():
        at_budget = [max((b for s, b in curve if s <= args.budget), default=0.0) for curve in per_seed]
        results[name] = {"trials": [len(trials) for trials in runs[name]], "best_at_budget": at_budget,
                         "mean_best_at_budget": statistics.mean(at_budget)}
    report = {"machine": machine(), "command": command_line(), "settings": settings, "space": SPACE, "searches": searches, "targets": targets, "results": results}
    print_tables(targets, results, finals, args.budget)
    if "tpe+asha" in searches:
        print(f"TPE + ASHA: {searches['tpe+asha']['searcher']}, {searches['tpe+asha']['scheduler']}")
    for row in targets:
        vs_expected = row["searches"].get("tpe+asha", {}).get("over_random_expected")
        if vs_expected is not None:
            verdict = "meets" if vs_expected <= 1 / 3 else "does not meet"
            print(f"target {100 * row['val_joint_acc']:.2f}%: TPE + ASHA needs {vs_expected:.2f}x the epochs random "
                  f"search needs in expectation; {verdict} the 1/3 floor")
    write_report(args.out, report)
    plot(curves, [row["val_joint_acc"] for row in targets], args.budget, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
