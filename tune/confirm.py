"""Confirmation: retrain chosen configs with several seeds on all 60k training images, score once on test.

This is the only place the harness touches the test set, and it never feeds back into search.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from dualnet import ARCHS, DualData, TrainConfig, evaluate_split, fit, load_data, save_model
from dualnet.files import write_atomic
from dualnet.train import pick_device

from .config import ConfigError


# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; the normal value beyond.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]
TEST_METRICS = ("joint_acc", "class_acc", "sum_acc")


def t975(df: int) -> float:
    """Return the 97.5% quantile of Student's t with ``df`` degrees of freedom (1.96 past 30)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean, sample std and a 95% t-interval of the mean; for a single value the std and the bounds
    are None (null in JSON), since one seed says nothing about the spread."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
    std = statistics.stdev(values)
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def train_and_test(config: dict[str, Any], data: DualData, threads: int) -> dict[str, Any]:
    """Train one seed on all training images and score it once on the test set.

    Returns:
        ``arch``, ``seed``, ``status``, the test metrics, the train seconds and the model's
        ``save_model`` bytes.
    """
    config = TrainConfig.from_dict({**config, "threads": threads})
    started = time.perf_counter()
    result = fit(config, data)
    test = evaluate_split(result.model, data.test) if result.status == "completed" else {}
    buffer = io.BytesIO()
    save_model(result.model, buffer, extra={"config": config.to_dict(), "test": test})
    return {"arch": config.arch, "seed": config.seed, "status": result.status,
            **{f"test_{k}": test.get(k, 0.0) for k in TEST_METRICS},
            "train_s": time.perf_counter() - started, "model": buffer.getvalue()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per design: mean ± std and 95% interval of each test metric, and the seeds that diverged (scored 0);
    for two designs, their paired difference."""
    archs = sorted({r["arch"] for r in runs})
    summary: dict[str, Any] = {"designs": {}}
    for arch in archs:
        mine = [r for r in runs if r["arch"] == arch]
        summary["designs"][arch] = {m: interval([r[f"test_{m}"] for r in mine]) for m in TEST_METRICS}
    if len(archs) == 2:
        a, b = archs
        by_seed = {r["seed"]: r for r in runs if r["arch"] == b}
        diffs = {m: [r[f"test_{m}"] - by_seed[r["seed"]][f"test_{m}"] for r in runs
                     if r["arch"] == a and r["seed"] in by_seed] for m in TEST_METRICS}
        summary["difference"] = {"of": f"{a} - {b}", "paired_by": "seed",
                                 **{m: interval(v) for m, v in diffs.items() if v}}
    summary["diverged"] = {arch: sorted(r["seed"] for r in runs if r["arch"] == arch and r["status"] == "diverged")
                           for arch in archs}
    return summary


def _save_model_file(run: dict[str, Any], models: Path) -> dict[str, Any]:
    """Move ``run``'s model bytes to ``models/<arch>-seed<k>.pt`` (atomically); return ``run`` with its path."""
    models.mkdir(parents=True, exist_ok=True)
    path = models / f"{run['arch']}-seed{run['seed']}.pt"
    write_atomic(path, run.pop("model"))
    return {**run, "model_path": str(path)}


def _remove_earlier_models(models: Path, kept: set[str]) -> int:
    """Delete the model files (``<arch>-seed<k>.pt``) in ``models`` that are not in ``kept``; return how many.

    A confirmation rerun into the same folder with fewer seeds or other designs would otherwise leave
    the earlier run's models beside files that ``confirm.json`` no longer describes.
    """
    pattern = re.compile(rf"({'|'.join(map(re.escape, ARCHS))})-seed\d+\.pt")
    earlier = [p for p in models.glob("*.pt") if pattern.fullmatch(p.name) and str(p) not in kept]
    for path in earlier:
        path.unlink()
    return len(earlier)


def run_confirm(configs: list[dict[str, Any]], seeds: int, epochs: int | None, out_dir: Path,
                data_dir: str | None = None, download: bool = True, cpus_per_task: int = 1,
                gpus_per_task: float = 0, parallel: bool = True, log=print) -> dict[str, Any]:
    """Train every config with seeds 0..seeds-1 (as parallel Ray tasks when ``parallel``) and write results.

    Writes ``out_dir/models/<arch>-seed<k>.pt`` as each run ends, so a later failure keeps the
    finished models, and ``out_dir/confirm.json`` (atomically) once all have ended. Then it removes
    the models an earlier confirmation left in that folder, so the folder holds one confirmation.

    Returns:
        The contents of ``confirm.json``.

    Raises:
        ConfigError: ``cpus_per_task`` or ``gpus_per_task`` is more than a local Ray has (see
            ``tune.sweep.check_capacity``), no Ray cluster answers at ``$RAY_ADDRESS``, a config asks
            for CUDA where its runs get no GPU, or ``gpus_per_task`` is given without Ray.
        ValueError: a bad training setting (named).
        DataError: the dataset is missing or damaged.
    """
    jobs = [{**c, "seed": seed, **({"epochs": epochs} if epochs else {})} for c in configs for seed in range(seeds)]
    if not parallel and gpus_per_task:
        raise ConfigError(f"--gpus-per-task {gpus_per_task:g}: reserves GPUs for Ray tasks; without Ray each run "
                          "trains on its config's device (device: auto takes a GPU where there is one)")
    for job in jobs:  # fail before any training
        device = TrainConfig.from_dict(job).device
        if not parallel:
            pick_device(device)
        elif device.startswith("cuda") and not gpus_per_task:
            # Ray hides every GPU from a task that reserved none.
            raise ConfigError(f"device: {device!r}, but each run reserves no GPU; pass --gpus-per-task "
                              "(e.g. 1, or 0.25 to share one), or set device: auto")
    if parallel:
        from .sweep import ray_preflight

        address = os.environ.get("RAY_ADDRESS")
        asked = {"CPU": ("--cpus-per-task", cpus_per_task), "GPU": ("--gpus-per-task", gpus_per_task)}
        own_ray = ray_preflight(address, asked, "run")
    data = load_data(data_dir, download=download, val_size=0)
    log(f"confirm: {len(jobs)} runs ({len(configs)} config(s) x {seeds} seeds) on {len(data.train)} training "
        f"images, scored once on {len(data.test)} test images")
    started = time.perf_counter()
    if parallel:
        import ray

        from .sweep import check_capacity, start_ray

        if own_ray:
            start_ray(address)
        try:
            check_capacity(asked, ray.cluster_resources(), "run", joined=bool(address))
            data_ref = ray.put(data)
            task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task)(train_and_test)
            pending = {task.remote(job, data_ref, cpus_per_task): job for job in jobs}
            runs = []
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                run = _save_model_file(ray.get(done[0]), out_dir / "models")
                pending.pop(done[0])
                runs.append(run)
                log(f"  {run['arch']:<6} seed {run['seed']}: test joint {100 * run['test_joint_acc']:.2f}% "
                    f"class {100 * run['test_class_acc']:.2f}% sum {100 * run['test_sum_acc']:.2f}% "
                    f"({run['train_s'] / 60:.1f} min)")
        finally:
            if own_ray:
                ray.shutdown()
    else:
        runs = [_save_model_file(train_and_test(job, data, cpus_per_task), out_dir / "models") for job in jobs]
    report = {"configs": configs, "seeds": seeds, "epochs": epochs, "wall_s": time.perf_counter() - started,
              "runs": sorted(runs, key=lambda r: (r["arch"], r["seed"])), **summarize(runs)}
    write_atomic(out_dir / "confirm.json", json.dumps(report, indent=2))
    removed = _remove_earlier_models(out_dir / "models", {r["model_path"] for r in runs})
    if removed:
        log(f"removed {removed} model(s) an earlier confirmation left in {out_dir / 'models'}")
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table of the confirmation results ("-" for a spread that one seed cannot give)."""
    def spread(s: dict[str, Any], sign: str = "") -> str:
        if s["std"] is None:
            return "-"
        return f"[{100 * s['ci95_low']:{sign}.2f}, {100 * s['ci95_high']:{sign}.2f}]"

    lines = [f"{'design':<8}{'metric':<11}{'mean':>8}{'std':>8}   95% interval   (n={report['seeds']} seeds, test set)"]
    for arch, stats in report["designs"].items():
        for metric, s in stats.items():
            std = f"{100 * s['std']:7.2f}" if s["std"] is not None else f"{'-':>7}"
            lines.append(f"{arch:<8}{metric:<11}{100 * s['mean']:7.2f}%{std}   {spread(s)}")
    if "difference" in report:
        d = report["difference"]
        for metric in TEST_METRICS:
            if metric in d:
                s = d[metric]
                lines.append(f"{d['of']:<19}{metric:<11}{100 * s['mean']:+7.2f} pts  95% interval "
                             f"{spread(s, '+')} (paired by seed)")
    for arch, seeds in report.get("diverged", {}).items():
        if seeds:
            lines.append(f"note: {arch} diverged with seed(s) {', '.join(map(str, seeds))}; each counts as 0 "
                         f"accuracy above")
    return "\n".join(lines)
