"""Sweep overhead: the same K trials x E epochs at the same concurrency, three ways, in one run.

  (a) python -m tune sweep          Ray Tune + OptunaSearch, checkpoints every epoch
  (b) plain Optuna, no Ray          one study in a journal file, `slots` processes, each loading the data itself
  (c) ideal                         sum of (a)'s trial training times / slots

Every trial trains the same fixed recipe (only the design alternates), so the three do the same work.
The harness's extra time is split into start-up (launch to first trial start), per-trial and
per-report costs, and shutdown (last report to exit, which includes writing the result files).
Start-up and shutdown are paid once per sweep, so (a)/(c) falls as K grows; K=32 is a short real sweep.

    python benchmarks/overhead.py                    # K=32 trials x E=2 epochs on all 50k images, 2 slots (~22 min)
    python benchmarks/overhead.py --trials 8         # the same at K=8 (~6 min), where start-up weighs most
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, at_least, command_line, machine, run_sweep_command, trial_start, write_report


def optuna_process(journal: str, n_trials: int, recipe: dict, data_kwargs: dict, threads: int) -> None:
    import optuna

    from dualnet import fit, load_data

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = load_data(**data_kwargs)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    study = optuna.load_study(study_name="plain", storage=storage)

    def objective(trial: optuna.Trial) -> float:
        arch = trial.suggest_categorical("arch", ["late", "pixel"])
        result = fit({**recipe, "arch": arch, "threads": threads}, data,
                     on_epoch=lambda r: trial.report(r.metrics["val_joint_acc"], r.epoch))
        return result.history[-1]["val_joint_acc"]

    study.optimize(objective, n_trials=n_trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=at_least(1), default=32, help="K, trials run each way (default: 32)")
    parser.add_argument("--epochs", type=at_least(1), default=2, help="E, epochs per trial (default: 2)")
    parser.add_argument("--slots", type=at_least(1), default=2,
                        help="trials at a time, one CPU each (default: 2)")
    parser.add_argument("--train-subset", type=at_least(1), default=None,
                        help="training images per epoch (default all 50k: ~25 s epochs on one core here)")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json",
                        help="JSON to write (default: benchmarks/results/overhead.json)")
    args = parser.parse_args()
    recipe = {"width": 16, "hidden": 256, "epochs": args.epochs, "batch_size": 128, "lr": 5e-3}
    data_kwargs = {"val_size": 10000, "train_subset": args.train_subset}
    work = Path(tempfile.mkdtemp(prefix="overhead-"))  # removed at the end; a failed sweep's error names it

    # (a) through the harness
    experiment = {"name": "overhead", "num_samples": args.trials, "max_concurrent": args.slots, "epochs": args.epochs,
                  "searcher": {"type": "random"}, "scheduler": {"type": "none"}, "resources": {"cpu": 1},
                  "data": data_kwargs,
                  "space": {"arch": {"choice": ["late", "pixel"]},
                            **{k: v for k, v in recipe.items() if k != "epochs"}}}
    launched_at, harness_wall, trials = run_sweep_command(experiment, work)
    train_s = [sum(r["epoch_s"] for r in rows) for rows in trials]
    first_start = min(trial_start(rows) for rows in trials)
    last_report = max(rows[-1]["timestamp"] for rows in trials)
    per_report = [r["time_this_iter_s"] - r["epoch_s"] for rows in trials for r in rows]
    ideal = sum(train_s) / args.slots
    running = last_report - first_start  # from the first trial's start to the last report

    # (b) plain Optuna across processes
    import optuna

    journal = str(work / "plain.journal")
    optuna.create_study(study_name="plain", direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    per_process = [args.trials // args.slots + (i < args.trials % args.slots) for i in range(args.slots)]
    context = multiprocessing.get_context("spawn")
    started = time.time()
    processes = [context.Process(target=optuna_process, args=(journal, n, recipe, data_kwargs, 1))
                 for n in per_process]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    plain_wall = time.time() - started
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise SystemExit(f"error: the plain Optuna processes exited with {failed} (their errors are above); "
                         f"(b) is not measured. Work folder: {work}")
    shutil.rmtree(work)

    report = {"machine": machine(), "command": command_line(),
              "trials": args.trials, "epochs": args.epochs, "slots": args.slots, "train_subset": args.train_subset,
              "mean_trial_train_s": sum(train_s) / len(train_s), "min_trial_train_s": min(train_s),
              "harness_wall_s": harness_wall, "plain_optuna_wall_s": plain_wall, "ideal_wall_s": ideal,
              "harness_over_plain": harness_wall / plain_wall, "harness_over_ideal": harness_wall / ideal,
              "running_over_ideal": running / ideal,
              "harness_startup_s": first_start - launched_at,
              "harness_shutdown_s": launched_at + harness_wall - last_report,
              "harness_per_trial_s": (running - ideal) * args.slots / args.trials,
              "harness_per_report_s": sum(per_report) / len(per_report)}
    print(f"{args.trials} trials x {args.epochs} epochs at {args.slots} slots, "
          f"{report['mean_trial_train_s']:.0f} s of training per trial")
    print(f"(a) harness      {harness_wall:7.1f} s   (a)/(b) {report['harness_over_plain']:.3f}   "
          f"(a)/(c) {report['harness_over_ideal']:.3f}")
    print(f"(b) plain Optuna {plain_wall:7.1f} s")
    print(f"(c) ideal        {ideal:7.1f} s")
    print(f"harness time: start-up {report['harness_startup_s']:.1f} s, shutdown {report['harness_shutdown_s']:.1f} s,"
          f" per trial {report['harness_per_trial_s']:.2f} s, per report {report['harness_per_report_s']:.3f} s; "
          f"first trial start to last report = {report['running_over_ideal']:.3f} x ideal")
    write_report(args.out, report)


if __name__ == "__main__":
    main()
