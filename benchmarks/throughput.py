"""Training throughput: dualnet's tensor pipeline against the original list-of-tuples DataLoader pipeline.

One run, same model and machine:
  original   torchvision dataset -> Python list of (image, one-hot, label, sum) -> DataLoader(128, shuffle) -> fp32,
             in a process of its own that never runs dualnet's ``fit`` (which changes process-wide settings)
  fp32       dualnet.fit, batches sliced from tensors, fp32, contiguous
  fp32+cl    the same with channels_last
  bf16+cl    the same with bf16 autocast and channels_last; only where the device has native bf16
             (where ``dualnet.train.pick_precision`` resolves ``auto`` to bf16), since elsewhere PyTorch runs bf16 convolutions on a slow path
plus the achieved GFLOP/s of each against this machine's measured fp32 and bf16 matmul peak, and a
ceiling: the model's convolutions and batch norms, each timed by itself as the default runs it, take
a time per step that no eager-PyTorch pipeline can go below (``layer_floor_ms``). dualnet's
default (``precision: auto``, channels_last) is bf16+cl where the device has native bf16 and fp32+cl
elsewhere; the table marks it.
Each pipeline first runs a short warm-up of its own (the first batches pay for one-time kernel
selection, which would otherwise count against whichever pipeline uses new kernels). Then they
take turns, one timed epoch each per round; the table gives the median over rounds, and the ratio
is the median of the per-round ratios.

    python benchmarks/throughput.py                 # speed only (3 rounds of 1 epoch each)
    python benchmarks/throughput.py --accuracy      # also 10-epoch joint accuracy of fp32 vs the default
    python benchmarks/throughput.py --profile       # where the default training step's time goes, by op
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from common import RESULTS, at_least, command_line, machine, write_report
from dualnet import DataError, build_model, evaluate_split, fit, load_data
from dualnet.train import TrainConfig, pick_device, pick_precision, precision_autocast


def matmul_peak_gflops(dtype: torch.dtype, device: str, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of a square matmul on ``device``: the practical peak the training is compared with."""
    size = 1024 if device == "cpu" else 8192
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if device != "cpu" and count % 10 == 0:
            torch.cuda.synchronize()
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size ** 3 * count / (time.perf_counter() - started) / 1e9


def training_flops_per_image(config: TrainConfig) -> float:
    """Forward FLOPs of one image, times 3 for forward + backward."""
    model = build_model(config.arch, width=config.width, hidden=config.hidden, depth=config.depth)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    return 3 * counter.get_total_flops() / 64


WARMUP_BATCHES = 20


def original_pipeline(data, config: TrainConfig, device: str) -> Callable[[], float]:
    """Build the original work's input path and model, run ``WARMUP_BATCHES`` untimed batches.

    On a GPU the model runs there and each batch is copied over from the DataLoader, as the original did.

    Returns:
        A function that trains one more epoch and returns its images/s.
    """
    torch.manual_seed(0)
    numbers = data.train_numbers(0, 0)
    pairs = []
    for image, label, number in zip(data.train.images, data.train.labels, numbers):
        one_hot = F.one_hot(number, 10).float()
        pairs.append((image, one_hot, int(label), int(label + number)))
    loader = DataLoader(pairs, batch_size=128, shuffle=True)
    model = build_model(config.arch, width=config.width, hidden=config.hidden, depth=config.depth).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()

    def step(images, one_hot, labels, sums) -> None:
        images, one_hot, labels, sums = (t.to(device) for t in (images, one_hot, labels, sums))
        class_logits, sum_logits = model(images, one_hot.argmax(1))
        loss = F.cross_entropy(class_logits, labels) + F.cross_entropy(sum_logits, sums)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for batch, tensors in enumerate(loader):
        if batch == WARMUP_BATCHES:
            break
        step(*tensors)

    def epoch() -> float:
        images_seen, started = 0, time.perf_counter()
        for tensors in loader:
            step(*tensors)
            images_seen += len(tensors[2])
        if device != "cpu":
            torch.cuda.synchronize()
        return images_seen / (time.perf_counter() - started)

    return epoch


def layer_floor_ms(config: TrainConfig, device: str, precision: str, reps: int = 20) -> dict[str, float]:
    """Time each convolution and batch norm of the model by itself, forward and backward, in channels_last
    and ``precision`` (bf16 autocast or fp32).

    These layers do the same work whatever feeds them, and eager PyTorch runs each as a kernel of its
    own, so their sum is a floor under any eager pipeline's step on this model and machine, and
    ``config.batch_size / floor`` a ceiling on its images/s. Each layer gets the input it saw in a
    real forward pass (same dtype, same memory layout); only the first convolution, whose input is
    the image, skips the input gradient, as in training.

    Returns:
        Milliseconds per step of each layer, median over ``reps``, keyed ``conv1``, ``bn1``, ...
    """
    model = build_model(config.arch, width=config.width, hidden=config.hidden, depth=config.depth).to(device)
    model = model.to(memory_format=torch.channels_last)
    layers = [m for m in model.trunk if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: inputs.setdefault(layer, args[0].detach()))
             for layer in layers]
    images = torch.randint(0, 256, (config.batch_size, 28, 28), dtype=torch.uint8, device=device)
    numbers = torch.randint(0, 10, (config.batch_size,), device=device)
    with precision_autocast(precision, torch.device(device)):
        model(images, numbers)
    for hook in hooks:
        hook.remove()

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    times: dict[str, float] = {}
    counts = {"conv": 0, "bn": 0}
    for index, layer in enumerate(layers):
        kind = "conv" if isinstance(layer, torch.nn.Conv2d) else "bn"
        counts[kind] += 1
        x = inputs[layer].clone().requires_grad_(index > 0)
        per_rep = []
        for rep in range(reps + 3):  # the first 3 pick kernels and warm caches
            started = time.perf_counter()
            with precision_autocast(precision, torch.device(device)):
                out = layer(x)
            out.backward(torch.ones_like(out))
            sync()
            if rep >= 3:
                per_rep.append(1e3 * (time.perf_counter() - started))
        times[f"{kind}{counts[kind]}"] = statistics.median(per_rep)
    return times


def _original_pipeline_process(connection, config: TrainConfig, threads: int, device: str) -> None:
    """Serve the original pipeline from its own process: one timed epoch per request.

    Its own process, because ``fit`` changes process-wide settings (the C allocator's thresholds)
    that the original work never had.
    """
    torch.set_num_threads(threads)
    epoch = original_pipeline(load_data(), config, device)
    connection.send("ready")
    while connection.recv() == "epoch":
        connection.send(epoch())


def profile_steps(config: dict) -> None:
    """Print, op by op, where the default (``precision: auto``, channels_last) training step of ``config`` spends
    its time.

    Profiles an epoch of ``2 * WARMUP_BATCHES`` batches after an unprofiled one, so one-time kernel
    selection is left out; the shares include the end-of-epoch bookkeeping of ``fit``.
    """
    from torch.profiler import profile

    subset = load_data(val_size=0, train_subset=2 * WARMUP_BATCHES * 128)
    fit(config, subset)
    with profile() as profiler:
        fit(config, subset)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="late", choices=["late", "pixel"], help="the design timed (default: late)")
    parser.add_argument("--width", type=at_least(1), default=16, help="channels of the first convolution (default: 16)")
    parser.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                        help=f"torch threads for every pipeline (default: torch's, {torch.get_num_threads()} here)")
    parser.add_argument("--accuracy", action="store_true", help="train fp32 and the default for --epochs and compare")
    parser.add_argument("--epochs", type=at_least(1), default=10, help="epochs of each --accuracy run (default: 10)")
    parser.add_argument("--rounds", type=at_least(1), default=3,
                        help="timed epochs per pipeline, taken in turns (default: 3)")
    parser.add_argument("--profile", action="store_true", help="only profile the default's training steps by op, "
                        "and exit")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json",
                        help="JSON to write (default: benchmarks/results/throughput.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data = load_data()
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = dict(arch=args.arch, width=args.width, threads=args.threads, epochs=1, device=device)
    if args.profile:
        profile_steps(base)
        return

    variants = {"fp32": dict(precision="fp32", channels_last=False), "fp32+cl": dict(precision="fp32",
                                                                                    channels_last=True)}
    default = f"{pick_precision('auto', pick_device(device))}+cl"  # what fit's precision: auto trains in here
    if default == "bf16+cl":
        variants["bf16+cl"] = dict(precision="bf16", channels_last=True)
    else:
        print(f"bf16+cl left out: this {device} has no native bf16, so PyTorch would run its bf16 convolutions "
              "on a slow path (dualnet's default trains in fp32 here)", flush=True)
    results: dict[str, dict] = {}
    flops = training_flops_per_image(TrainConfig.from_dict(base))
    peaks = {"fp32": matmul_peak_gflops(torch.float32, device), "bf16": matmul_peak_gflops(torch.bfloat16, device)}

    connection, child_end = multiprocessing.Pipe()
    original_process = multiprocessing.get_context("spawn").Process(
        target=_original_pipeline_process, args=(child_end, TrainConfig.from_dict(base), args.threads, device))
    original_process.start()
    child_end.close()  # so that recv() raises EOFError, rather than waits forever, if the child dies
    try:
        connection.recv()  # "ready"
    except EOFError:
        raise SystemExit("the original pipeline's process died while starting; its error is above") from None

    def original_epoch() -> float:
        connection.send("epoch")
        return connection.recv()

    warmup = load_data(val_size=0, train_subset=WARMUP_BATCHES * 128)
    for extra in variants.values():
        fit({**base, **extra}, warmup)
    # The pipelines take turns, one epoch each per round, so a drift in the machine's speed
    # during the run lands on all of them rather than on whichever ran during it.
    speeds: dict[str, list[float]] = {"original": [], **{name: [] for name in variants}}
    for _ in range(args.rounds):
        speeds["original"].append(original_epoch())
        for name, extra in variants.items():
            speeds[name].append(fit({**base, **extra}, data).history[-1]["images_per_s"])
    connection.send("stop")
    original_process.join()
    for name, per_round in speeds.items():
        ratios = [speed / original for speed, original in zip(per_round, speeds["original"])]
        results[name] = {"images_per_s": statistics.median(per_round), "images_per_s_per_round": per_round,
                         "ratio_vs_original": statistics.median(ratios), "ratio_per_round": ratios,
                         "gflops": statistics.median(per_round) * flops / 1e9}
    config = TrainConfig.from_dict(base)
    layer_ms = layer_floor_ms(config, device, precision=default.split("+")[0])
    floor_ms = sum(layer_ms.values())
    ceiling_speed = config.batch_size * 1e3 / floor_ms
    ceiling = {"ms_per_step_by_layer": layer_ms, "ms_per_step": floor_ms, "images_per_s": ceiling_speed,
               "ratio_vs_original": ceiling_speed / results["original"]["images_per_s"]}

    if args.accuracy:
        for name, extra in ((name, variants[name]) for name in ("fp32", default)):
            result = fit({**base, **extra, "epochs": args.epochs}, data)
            test = evaluate_split(result.model, data.test)
            results[name].update(val_joint_acc=result.history[-1]["val_joint_acc"], test_joint_acc=test["joint_acc"])

    report = {"command": command_line(),
              "machine": f"{machine()}, {torch.get_num_threads()} threads, {device}",
              "torch": torch.__version__, "arch": args.arch, "width": args.width, "default": default,
              "training_mflop_per_image": flops / 1e6, "matmul_peak_gflops": peaks, "results": results,
              "convolutions_and_batch_norms": ceiling}
    print(f"{'pipeline':<20}{'images/s':>10}{'x original':>12}{'GFLOP/s':>10}{'val joint':>11}{'test joint':>11}")
    for name, row in results.items():
        label = f"{name} (default)" if name == default else name
        val = f"{100 * row['val_joint_acc']:.2f}%" if "val_joint_acc" in row else "-"
        test = f"{100 * row['test_joint_acc']:.2f}%" if "test_joint_acc" in row else "-"
        print(f"{label:<20}{row['images_per_s']:>10,.0f}{row['ratio_vs_original']:>11.2f}x{row['gflops']:>10.1f}"
              f"{val:>11}{test:>11}")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"training costs {flops / 1e6:.1f} MFLOP per image")
    print(f"the {default} convolutions and batch norms alone, each timed by itself: {floor_ms:.1f} ms per "
          f"{config.batch_size}-image step, a ceiling of {ceiling['images_per_s']:,.0f} images/s "
          f"({ceiling['ratio_vs_original']:.2f}x the original) for eager PyTorch on this model and machine")
    for name in variants:
        print(f"{name} vs original, per round: " + ", ".join(f"{r:.2f}x" for r in results[name]["ratio_per_round"]))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
