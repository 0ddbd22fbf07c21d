"""Command line: ``python -m tune sweep EXPERIMENT.yaml [flags]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dualnet import DataError

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
    sweep.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also its torch threads)")
    sweep.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; fractions share a GPU (e.g. 0.25)")
    sweep.add_argument("--epochs", type=int, help="full training budget of a trial in epochs")
    sweep.add_argument("--name", help="run name (folder under storage); default: the file's name")
    sweep.add_argument("--storage", help="results folder or URI (s3://, gs://, a shared mount); on a "
                       "multi-node cluster it must be reachable from every node")
    sweep.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                       help="join an existing Ray cluster (default: $RAY_ADDRESS, else start Ray locally)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep in its run folder; "
                       "finished trials are kept, unfinished ones continue from their checkpoints")
    sweep.add_argument("--quiet", action="store_true", help="no live progress table")
    return parser


def sweep_command(args: argparse.Namespace) -> int:
    if not args.address:
        # Read when Ray is imported: a local Ray then binds GCS, raylet and workers to 127.0.0.1
        # instead of the machine's public address.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from .sweep import SweepError, run_sweep

    overrides = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "resources.cpu": args.cpus_per_trial, "resources.gpu": args.gpus_per_trial,
                 "epochs": args.epochs, "name": args.name and check_name(args.name), "storage": args.storage}
    experiment = load_experiment(args.experiment, overrides)
    try:
        outcome = run_sweep(experiment, address=args.address, resume=args.resume, verbose=not args.quiet)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if not outcome.trials.empty else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return sweep_command(args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
