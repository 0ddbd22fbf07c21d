"""Command line: ``python -m tune sweep EXPERIMENT.yaml [flags]``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dualnet import DataError
from dualnet.files import atomic_path

from .config import ConfigError, check_name, load_experiment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune", description="Ray Tune + Optuna sweeps over the "
                                     "dualnet fusion designs.")
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser(
        "sweep", help="run or resume a hyperparameter sweep",
        description="Run a sweep defined by an experiment file. Flags override the file. With no --address a "
        "local Ray starts in-process; results go to <storage>/<name> (default ./runs/<name>).")
    sweep.add_argument("experiment", type=Path, help="experiment YAML, e.g. experiments/quick.yaml")
    sweep.add_argument("--num-samples", type=int, help="number of trials")
    sweep.add_argument("--max-concurrent", type=int, help="trials running at once")
    sweep.add_argument("--cpus-per-trial", type=float, help="CPUs per trial; its torch threads are the whole CPUs in it (at least 1)")
    sweep.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; fractions share a GPU (e.g. 0.25)")
    sweep.add_argument("--epochs", type=int, help="full training budget of a trial in epochs")
    sweep.add_argument("--epoch-budget", type=int, help="epochs all trials may train together; once spent, no "
                       "new trial starts and running ones finish")
    sweep.add_argument("--name", help="run name (folder under storage); default: the experiment's name: key")
    sweep.add_argument("--storage", help="results folder or URI (s3://, gs://, a shared mount); on a "
                       "multi-node cluster it must be reachable from every node")
    sweep.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="join an existing Ray cluster (default: $RAY_ADDRESS, else start Ray locally)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep in its run folder; "
                       "finished trials are kept, unfinished ones continue from their checkpoints")
    sweep.add_argument("--quiet", action="store_true", help="print only errors and warnings: no progress lines, "
                       "leaderboard or summary (the run folder gets the same files)")

    analyze = commands.add_parser(
        "analyze", help="leaderboard, best configs, importances, plots and an HTML report of one or more sweeps",
        description="Read sweeps from their run folders (running, interrupted or finished; no Ray needed).")
    analyze.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    analyze.add_argument("--top", type=int, default=10, help="rows in the leaderboard (default 10)")
    analyze.add_argument("--by", help="group best configs and importances by this column, e.g. arch")
    analyze.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/analysis)")

    best = commands.add_parser("best", help="export the best config as YAML for 'dualnet train' and 'tune confirm'")
    best.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    best.add_argument("--by", help="one best config per value of this column; a config file holds one per design, "
                      "so arch (or a column that splits the designs no further)")
    best.add_argument("-o", "--output", type=Path, required=True, help="YAML file to write")

    confirm = commands.add_parser(
        "confirm", help="retrain a config with several seeds on all 60k training images and score on test",
        description="The only tune command that reads the test set. Seeds run as parallel Ray tasks.")
    confirm.add_argument("config", type=Path, help="YAML from 'python -m tune best' (one config or one per design)")
    confirm.add_argument("--seeds", type=int, default=5, help="seeds per config (default 5)")
    confirm.add_argument("--epochs", type=int, help="override the config's epochs")
    confirm.add_argument("--out", type=Path, help="output folder (default: runs/confirm-<config name>)")
    confirm.add_argument("--cpus-per-task", type=int, default=1, help="CPUs (torch threads) per seed (default 1)")
    confirm.add_argument("--gpus-per-task", type=float, default=0, help="GPUs per seed; fractions share a GPU "
                         "(default 0: Ray runs the seeds on CPUs)")
    confirm.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    confirm.add_argument("--no-download", action="store_true", help="never download the dataset")
    confirm.add_argument("--no-ray", action="store_true", help="train seeds one after another in this process")
    return parser


def analyze_command(args: argparse.Namespace) -> int:
    from . import analysis, report
    from .sweep import rank_trials

    if args.top < 1:
        raise ConfigError(f"--top {args.top}: must be >= 1")
    sweep = analysis.load(args.run_dirs)
    if args.by and args.by not in sweep.trials:
        raise analysis.AnalysisError(f"--by {args.by}: no such column; try one of {', '.join(sweep.params)}")
    sweep.require_results()
    out = args.out or args.run_dirs[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    metric = sweep.metric
    varied = [p for p in sweep.params if sweep.trials[p].nunique() > 1 or p == "arch"]
    columns = [c for c in ["run", "trial_id", "status", *varied, "epochs_run", f"last_{metric}",
                           f"best_{metric}", "wall_s"] if c in sweep.trials]
    board = rank_trials(sweep.trials, f"last_{metric}", sweep.mode, "status", with_partial=True)
    board = board.head(args.top)[columns]
    importances = sweep.importances(by=args.by)
    print(f"Leaderboard by final {metric} (validation), top {args.top} of {len(sweep.trials)}:")
    print(board.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nBest config per {args.by or 'arch'}:")
    best = sweep.best(by=args.by or "arch")
    print(best[[c for c in columns if c in best]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\nImportances (fANOVA over full-budget trials):")
    print(importances.to_string(index=False, float_format=lambda v: f"{v:.3f}") if not importances.empty
          else "  not enough full-budget trials yet")
    for name, frame in (("trials", sweep.trials), ("history", sweep.history), ("importances", importances)):
        with atomic_path(out / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        if name != "importances":
            with atomic_path(out / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
    plots = report.write_plots(sweep, importances, out)
    page = report.write_html(sweep, board, importances, plots, out / "report.html")
    print(f"\nwrote {out}/trials.*, history.*, importances.csv, {len(plots)} plots and {page}")
    return 0


def best_command(args: argparse.Namespace) -> int:
    from dualnet import TrainConfig

    from . import analysis
    from .sweep import write_config_file

    sweep = analysis.load(args.run_dir)
    sweep.require_results()
    rows = sweep.best(by=args.by)
    configs = []
    for _, row in rows.iterrows():
        config = {p: (row[p].item() if hasattr(row[p], "item") else row[p]) for p in sweep.params}
        config["epochs"] = int(next(iter(sweep.experiments.values())).epochs)
        configs.append(config)
    archs = [config.get("arch", TrainConfig.arch) for config in configs]
    repeated = sorted({arch for arch in archs if archs.count(arch) > 1})
    if repeated:
        raise analysis.AnalysisError(f"--by {args.by} gives several configs for the {repeated[0]!r} design, and a "
                                     "config file holds one per design; use --by arch, or leave --by out")
    meta = {"run": str(args.run_dir), "metric": sweep.metric,
            "trials": {row["trial_id"]: float(row[f"last_{sweep.metric}"]) for _, row in rows.iterrows()},
            "note": "validation metrics; confirm on test with python -m tune confirm"}
    write_config_file(args.output, configs, meta)
    print(f"wrote {args.output} ({len(configs)} config(s))")
    for _, row in rows[rows["status"] != "completed"].iterrows():
        print(f"note: no {row['arch']} trial ran the full budget; its config comes from trial "
              f"{row['trial_id']} ({row['status']} after {int(row['epochs_run'])} epoch(s)), so its score is not "
              "comparable; tune confirm trains it fully", file=sys.stderr)
    return 0


def confirm_command(args: argparse.Namespace) -> int:
    from dualnet.train import load_config_file

    from .confirm import format_summary, run_confirm

    for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--cpus-per-task", args.cpus_per_task)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1")
    gpus = args.gpus_per_task
    if not (gpus == 0 or 0 < gpus < 1 or (gpus >= 1 and float(gpus).is_integer())):
        raise ConfigError(f"--gpus-per-task {gpus:g}: must be 0, a fraction below 1 or a whole number")
    try:
        configs = load_config_file(args.config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # Any file name gives a folder name; characters a folder name should not hold become dashes.
    out = args.out or Path("runs") / f"confirm-{re.sub(r'[^A-Za-z0-9_.-]+', '-', args.config.stem)}"
    try:
        report = run_confirm(configs, args.seeds, args.epochs, out, data_dir=args.data_dir,
                             download=not args.no_download, cpus_per_task=args.cpus_per_task,
                             gpus_per_task=args.gpus_per_task, parallel=not args.no_ray)
    except ValueError as exc:  # a setting only the machine rules out, e.g. device: cuda without a GPU
        raise ConfigError(str(exc)) from None
    print(format_summary(report))
    print(f"wrote {out}/confirm.json and {len(report['runs'])} models in {out}/models")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    from .sweep import EXPERIMENT_FILE, SweepError, run_location, run_sweep

    overrides = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "resources.cpu": args.cpus_per_trial, "resources.gpu": args.gpus_per_trial,
                 "epochs": args.epochs, "epoch_budget": args.epoch_budget,
                 "name": args.name and check_name(args.name), "storage": args.storage}
    experiment = load_experiment(args.experiment, overrides)
    try:
        outcome = run_sweep(experiment, address=args.address, resume=args.resume, verbose=not args.quiet)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before Ray's loop took over the signal, or after it ended
        started = (run_location(experiment)[1] / EXPERIMENT_FILE).is_file()
        print("interrupted; continue with --resume" if started else "interrupted before the sweep started",
              file=sys.stderr)
        return 130
    if not outcome.finished:
        return 130  # Ray took the Ctrl+C and stopped the trials; run_sweep has said how to resume
    if outcome.best_config is None:
        print(f"error: no trial reported a result; each trial's error.txt in {outcome.run_dir} says why",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from .analysis import AnalysisError

    args = build_parser().parse_args(argv)
    commands = {"sweep": sweep_command, "analyze": analyze_command, "best": best_command, "confirm": confirm_command}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, AnalysisError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # sweep_command handles its own: only a sweep can be resumed
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
