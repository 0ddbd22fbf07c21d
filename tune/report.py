"""Plots (PNG) and one self-contained ``report.html`` for a loaded sweep."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dualnet.files import atomic_path, write_atomic  # noqa: E402

from .analysis import Sweep  # noqa: E402

ARCH_COLOURS = {"late": "#1f77b4", "pixel": "#d62728"}


def _colour(arch: str) -> str:
    return ARCH_COLOURS.get(arch, "#555555")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def learning_curves(sweep: Sweep, out: Path, top: int = 8) -> Path:
    metric = sweep.metric
    best_ids = sweep.best(top=top)["trial_id"].tolist()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for trial_id in best_ids:
        rows = sweep.history[sweep.history["trial_id"] == trial_id]
        arch = rows["arch"].iloc[0] if not rows.empty else ""
        ax.plot(rows["epoch"], rows[metric], marker="o", ms=3, color=_colour(arch), alpha=0.8,
                label=f"{trial_id} ({arch})")
    ax.set(xlabel="epoch", ylabel=f"{metric} (validation)", title=f"Learning curves of the top {len(best_ids)} trials")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "learning_curves.png")


def metric_vs_param(sweep: Sweep, param: str, out: Path) -> Path:
    metric = f"last_{sweep.metric}"
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, group in sweep.trials.groupby("arch"):
        full = group[group["status"] == "completed"]
        early = group[group["status"] != "completed"]
        ax.scatter(full[param], full[metric], color=_colour(arch), label=f"{arch} (full budget)", s=28)
        ax.scatter(early[param], early[metric], color=_colour(arch), marker="x", alpha=0.5, s=22,
                   label=f"{arch} (stopped early / other)")
    if param == "lr":
        ax.set_xscale("log")
    ax.set(xlabel=param, ylabel=f"final {sweep.metric} (validation)", title=f"{sweep.metric} against {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out / f"metric_vs_{param}.png")


def parallel_coordinates(sweep: Sweep, out: Path) -> Path:
    params = [p for p in sweep.params if sweep.trials[p].nunique() > 1 and p != "arch"]
    columns = params + [f"last_{sweep.metric}"]
    frame = sweep.trials[sweep.trials["status"] == "completed"]
    if frame.empty:
        frame = sweep.trials
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(columns)), 4.2))
    scaled = pd.DataFrame(index=frame.index)
    for column in columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values):
            codes = {v: i for i, v in enumerate(sorted(values.astype(str).unique()))}
            values = values.astype(str).map(codes)
        values = values.astype(float)
        span = values.max() - values.min()
        scaled[column] = (values - values.min()) / span if span else 0.5
    for idx, row in scaled.iterrows():
        ax.plot(range(len(columns)), row.values, color=_colour(frame.loc[idx, "arch"]), alpha=0.6)
    ax.set_xticks(range(len(columns)), [c.removeprefix("last_") for c in columns], rotation=20, fontsize=8)
    ax.set_yticks([0, 1], ["min", "max"])
    ax.set_title("Parallel coordinates of full-budget trials (colour: design)")
    ax.grid(alpha=0.3)
    return _save(fig, out / "parallel_coordinates.png")


def importance_bars(importances: pd.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if importances.empty:
        ax.text(0.5, 0.5, "not enough full-budget trials for fANOVA", ha="center", va="center")
        ax.set_axis_off()
    else:
        pivot = importances.pivot(index="param", columns="group", values="importance").fillna(0)
        pivot = pivot.loc[pivot.max(axis=1).sort_values().index]
        pivot.plot.barh(ax=ax, color=[ARCH_COLOURS.get(g, "#777777") for g in pivot.columns])
        ax.set(xlabel="fANOVA importance (sums to 1 per group)", ylabel="", title="Hyperparameter importance")
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, out / "importances.png")


def design_comparison(sweep: Sweep, out: Path) -> Path:
    metric = f"last_{sweep.metric}"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    archs = sorted(sweep.trials["arch"].dropna().unique())
    full = sweep.trials[sweep.trials["status"] == "completed"]
    data = [full.loc[full["arch"] == a, metric].dropna() for a in archs]
    if not any(len(d) for d in data):
        ax.text(0.5, 0.5, "no full-budget trials yet", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, out / "design_comparison.png")
    ax.boxplot(data, tick_labels=archs, showfliers=False)
    for i, (arch, values) in enumerate(zip(archs, data), start=1):
        ax.scatter([i] * len(values), values, color=_colour(arch), alpha=0.7, s=20, zorder=3)
    ax.set(ylabel=f"final {sweep.metric} (validation)", title="Designs compared (full-budget trials)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out / "design_comparison.png")


def write_plots(sweep: Sweep, importances: pd.DataFrame, out: Path) -> list[Path]:
    """Write every plot into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [learning_curves(sweep, out)]
    paths += [metric_vs_param(sweep, p, out) for p in ("lr", "width") if p in sweep.trials]
    paths += [parallel_coordinates(sweep, out), importance_bars(importances, out), design_comparison(sweep, out)]
    return paths


def write_html(sweep: Sweep, leaderboard: pd.DataFrame, importances: pd.DataFrame, plots: list[Path],
               path: Path) -> Path:
    """One HTML file with every plot embedded as data URIs, so it opens anywhere."""
    counts = sweep.trials["status"].value_counts().to_dict()
    fixed = ", ".join(f"{p}={sweep.trials[p].iloc[0]}" for p in sweep.params if sweep.trials[p].nunique() == 1)
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem.replace('_', ' '))}</figcaption></figure>" for p in plots)
    runs = ", ".join(html.escape(n) for n in sweep.experiments)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sweep report: {runs}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }}
table {{ border-collapse: collapse; font-size: 0.78rem; margin: 0.5rem 0 1.5rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
img {{ max-width: 520px; border: 1px solid #ddd; }}
figcaption {{ text-align: center; font-size: 0.8rem; color: #555; }}
.note {{ color: #555; font-size: 0.9rem; }}
.scroll {{ overflow-x: auto; }}
</style></head><body>
<h1>Sweep report: {runs}</h1>
<p class="note">{len(sweep.trials)} trials: {html.escape(', '.join(f'{v} {k}' for k, v in counts.items()))}.
All accuracies are on the validation split; confirm a config on the test set with
<code>python -m tune confirm</code>.</p>
<h2>Leaderboard ({html.escape(sweep.metric)})</h2>
<div class="scroll">{leaderboard.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)}</div>
<p class="note">Fixed in every trial: {html.escape(fixed) or "nothing"}.</p>
<h2>Importances (fANOVA, full-budget trials)</h2>
{importances.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0) if not importances.empty
        else '<p class="note">Not enough full-budget trials.</p>'}
<h2>Plots</h2>
{images}
</body></html>
"""
    write_atomic(path, page)
    return path
