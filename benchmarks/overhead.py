"""Sweep overhead: the same K trials x E epochs at the same concurrency, three ways, in one run.

  (a) python -m tune sweep          Ray Tune + OptunaSearch, checkpoints every epoch
  (b) plain Optuna, no Ray          one study in a journal file, `slots` processes, each loading the data itself
  (c) ideal                         sum of (a)'s trial training times / slots

Every trial trains the same fixed recipe (only the design alternates), so the three do the same work.

    python benchmarks/overhead.py                    # K=4 trials x E=2 epochs, 2 slots, ~30 s trials
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


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
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=25000, help="sets the trial length (~15 s/epoch here)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.json"))
    args = parser.parse_args()
    recipe = {"width": 16, "hidden": 256, "epochs": args.epochs, "batch_size": 128, "lr": 5e-3}
    data_kwargs = {"val_size": 10000, "train_subset": args.train_subset}
    work = Path(tempfile.mkdtemp(prefix="overhead-"))

    # (a) through the harness
    experiment = {"name": "overhead", "num_samples": args.trials, "max_concurrent": args.slots, "epochs": args.epochs,
                  "searcher": {"type": "random"}, "scheduler": {"type": "none"}, "resources": {"cpu": 1},
                  "data": data_kwargs, "storage": str(work / "runs"),
                  "space": {"arch": {"choice": ["late", "pixel"]},
                            **{k: v for k, v in recipe.items() if k != "epochs"}}}
    (work / "overhead.yaml").write_text(yaml.safe_dump(experiment))
    harness_started = time.time()
    subprocess.run([sys.executable, "-m", "tune", "sweep", str(work / "overhead.yaml"), "--quiet"], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    harness_wall = time.time() - harness_started
    rows = []
    for result in (work / "runs" / "overhead").glob("*/result.json"):
        rows.append([json.loads(line) for line in result.read_text().splitlines()])
    train_s = [sum(r["epoch_s"] for r in trial) for trial in rows]
    first_start = min(trial[0]["timestamp"] - trial[0]["time_this_iter_s"] for trial in rows)
    per_report = [r["time_this_iter_s"] - r["epoch_s"] for trial in rows for r in trial]
    ideal = sum(train_s) / args.slots

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

    startup = first_start - harness_started
    report = {"trials": args.trials, "epochs": args.epochs, "slots": args.slots,
              "mean_trial_train_s": sum(train_s) / len(train_s),
              "harness_wall_s": harness_wall, "plain_optuna_wall_s": plain_wall, "ideal_wall_s": ideal,
              "harness_over_plain": harness_wall / plain_wall, "harness_over_ideal": harness_wall / ideal,
              "harness_startup_s": startup,
              "harness_per_trial_s": (harness_wall - startup - ideal) * args.slots / args.trials,
              "harness_per_report_s": sum(per_report) / len(per_report)}
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
