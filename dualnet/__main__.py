"""Command line: ``python -m dualnet train --arch late|pixel|both --epochs 10 ...``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from .data import DataError, load_data, pixel_overlap_fraction
from .models import ARCHS, save_model
from .train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig, evaluate_split, fit, load_config_file

HELP = {
    "arch": "fusion design to train", "epochs": "training epochs", "width": "conv channels of the first stage "
    "(the second has twice as many)", "hidden": "units of the fully connected layer", "depth": "conv layers per "
    "stage", "dropout": "dropout before the heads", "optimizer": "optimizer", "lr": "learning rate (peak for "
    "onecycle)", "momentum": "SGD momentum (Nesterov; AdamW's beta1 "
    "follows onecycle's 0.95-0.85 cycle)", "weight_decay": "decoupled weight decay (AdamW) or L2 (SGD)",
    "schedule": "learning-rate schedule, stepped per batch", "batch_size": "training batch size",
    "seed": "training seed: init, shuffling, each epoch's numbers, dropout", "threads": "torch threads "
    "(0 = torch's default)", "precision": "bf16 autocast, plain fp32, or auto: bf16 where the device computes it "
    "natively (CUDA compute capability 8.0+; AVX-512 or AMX CPUs), else fp32",
    "channels_last": "channels_last weights (faster on CPU and GPU)", "device": "auto, cpu or cuda[:N]",
}
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualnet", description="Train the two-input, two-output "
                                     "Fashion-MNIST networks without Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train one or both designs and report validation (and optionally test) accuracy",
        description="Train on the training split, score on the validation split each epoch. "
        "Flags override --config, which overrides the defaults shown.")
    defaults = TrainConfig()
    train.add_argument("--config", type=Path, help="YAML file of training settings, e.g. from "
                       "'python -m tune best'; holding one config per design trains each")
    train.add_argument("--arch", choices=[*ARCHS, "both"], help=f"{HELP['arch']} (default: {defaults.arch}, "
                       "or every design in --config)")
    for f in fields(TrainConfig):
        if f.name == "arch":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{HELP[f.name]} (default: {default})")
        else:
            train.add_argument(flag, type=type(default), choices=CHOICES.get(f.name), default=None,
                               help=f"{HELP[f.name]} (default: {default})")
    data = train.add_argument_group("data")
    data.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files (.gz or raw); "
                      "also $DUALNET_DATA_DIR")
    data.add_argument("--no-download", action="store_true", help="never download; fail if no local copy is found")
    data.add_argument("--val-size", type=int, default=10_000, help="training images held out for validation "
                      "(default 10000; 0 trains on all 60k and scores nothing each epoch, e.g. with --eval-test)")
    data.add_argument("--train-subset", type=int, default=None, help="train on only this many images (quick runs)")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the validation split and of the fixed "
                      "validation/test numbers")
    out = train.add_argument_group("output")
    out.add_argument("--eval-test", action="store_true", help="after training, score once on the 10k test set")
    out.add_argument("--save", type=Path, help="write the trained model here (when training both designs, "
                     "NAME-late.pt and NAME-pixel.pt); load it with dualnet.load_model")
    return parser


def _configs(args: argparse.Namespace) -> list[TrainConfig]:
    base = load_config_file(args.config) if args.config else [{}]
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if f.name != "arch" and getattr(args, f.name) is not None}
    if args.arch == "both":
        archs = list(ARCHS)
    elif args.arch:
        archs = [args.arch]
    else:
        archs = [entry.get("arch", TrainConfig.arch) for entry in base]
    configs = []
    for arch in archs:
        matching = [entry for entry in base if entry.get("arch", TrainConfig.arch) == arch]
        if not matching and "arch" in base[0]:
            warnings.warn(f"{args.config} holds no {arch} config; {arch} trains with the settings of its "
                          f"{base[0]['arch']} config")
        configs.append(TrainConfig.from_dict({**(matching or base)[0], **overrides, "arch": arch}))
    return configs


def _epoch_line(arch: str, epochs: int, metrics: dict, images: int) -> str:
    line = f"[{arch}] epoch {metrics['epoch']:>2}/{epochs} | images {images} | train loss {metrics['train_loss']:.4f}"
    if "val_n" in metrics:  # --val-size 0 trains on every image and has nothing to score each epoch
        n = metrics["val_n"]
        line += (f" | val class {metrics['val_class_correct']}/{n} {100 * metrics['val_class_acc']:.2f}%"
                 f" | sum {metrics['val_sum_correct']}/{n} {100 * metrics['val_sum_acc']:.2f}%"
                 f" | joint {100 * metrics['val_joint_acc']:.2f}%")
    return line + f" | {metrics['images_per_s']:,.0f} img/s {metrics['precision']} | {metrics['epoch_s']:.1f} s"


def _save_path(save: Path, config: TrainConfig, several: bool) -> Path:
    return save.with_name(f"{save.stem}-{config.arch}{save.suffix or '.pt'}") if several else save


def train_command(args: argparse.Namespace) -> int:
    configs = _configs(args)
    for config in configs if args.save else []:
        # Found now rather than after training: a bad --save would otherwise cost the whole run.
        path = _save_path(args.save, config, len(configs) > 1)
        if path.is_dir():
            raise ValueError(f"--save {path}: is a folder; give a file name such as {path / 'model.pt'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise ValueError(f"--save {path}: cannot write to {path.parent}")
    data = load_data(args.data_dir, download=not args.no_download, val_size=args.val_size,
                     seed=args.data_seed, train_subset=args.train_subset)
    print(f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images", flush=True)
    summary = []
    for config in configs:
        if config.arch == "pixel":
            print(f"[pixel] the number overwrites garment ink in {100 * pixel_overlap_fraction(data.train.images):.1f}%"
                  " of training images", flush=True)
        result = fit(config, data, on_epoch=lambda report, c=config: print(
            _epoch_line(c.arch, c.epochs, report.metrics, len(data.train)), flush=True))
        final = result.history[-1]
        row = {"arch": config.arch, "status": result.status, "val_joint_acc": final.get("val_joint_acc"),
               "seconds": sum(m["epoch_s"] for m in result.history)}
        if args.eval_test and result.status == "completed":
            test = evaluate_split(result.model, data.test)
            row.update(test_class_acc=test["class_acc"], test_sum_acc=test["sum_acc"], test_joint_acc=test["joint_acc"])
            print(f"[{config.arch}] test: class {100 * test['class_acc']:.2f}% | sum {100 * test['sum_acc']:.2f}%"
                  f" | joint {100 * test['joint_acc']:.2f}% ({test['joint_correct']}/{test['n']})", flush=True)
        if result.status == "diverged":
            print(f"[{config.arch}] diverged at epoch {final['epoch']}: the loss became NaN or inf; "
                  "lower --lr", flush=True)
        if args.save:
            path = _save_path(args.save, config, len(configs) > 1)
            save_model(result.model, path, extra={"config": config.to_dict(), "history": result.history, **row})
            print(f"[{config.arch}] saved {path}", flush=True)
        summary.append(row)
    if len(summary) > 1:
        print("\narch   status     val_joint  test_joint  minutes")
        for row in summary:
            test = f"{100 * row['test_joint_acc']:.2f}%" if "test_joint_acc" in row else "-"
            val = f"{100 * row['val_joint_acc']:.2f}%" if row["val_joint_acc"] is not None else "-"
            print(f"{row['arch']:<6} {row['status']:<10} {val:<10} {test:<10}  "
                  f"{row['seconds'] / 60:.1f}")
    return 1 if any(row["status"] != "completed" for row in summary) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # One line per warning (fit warns about a slow precision), not the source line that raised it.
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    try:
        return train_command(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
