"""Read sweeps back from their run folders alone (no live Ray): trials, per-epoch history, best configs, importances.

    from tune import analysis
    sweep = analysis.load("runs/default")
    sweep.trials, sweep.history, sweep.best(by="arch"), sweep.importances(by="arch")

Works on running, interrupted and finished sweeps: trial status comes from the Optuna
study (which the harness keeps honest about early stops), metrics from each trial's
``result.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import optuna
import pandas as pd

from .config import METRICS, ConfigError, Experiment, load_experiment, metric_mode
from .sweep import (EXPERIMENT_FILE, MACHINE_KEYS, STUDY_FILE, is_uri, quiet_optuna, rank_trials, study_storage,
                    trial_status)



class AnalysisError(ValueError):
    """The folder is not a run folder, or holds no results yet; one line."""


def _read_experiment(run_dir: Path) -> Experiment:
    path = run_dir / EXPERIMENT_FILE
    if not path.is_file():
        raise AnalysisError(f"{run_dir} is not a sweep run folder ({EXPERIMENT_FILE} missing); "
                            f"give the folder that 'python -m tune sweep' printed")
    try:
        return load_experiment(path)
    except ConfigError as exc:
        raise AnalysisError(f"unreadable run: {exc}") from None


def _study_states(run_dir: Path, name: str) -> dict[str, optuna.trial.FrozenTrial]:
    if not (run_dir / STUDY_FILE).is_file():
        return {}
    try:
        study = optuna.load_study(study_name=name, storage=study_storage(run_dir))
    except KeyError:  # the sweep has created the journal file but not yet the study in it
        return {}
    return {t.user_attrs["ray_trial_id"]: t for t in study.get_trials(deepcopy=False) if "ray_trial_id" in t.user_attrs}


def _status(rows: list[dict], ot_trial: optuna.trial.FrozenTrial | None, epochs: int, errored: bool) -> str:
    """``trial_status`` with what the run folder knows: the study says whether a trial failed or was pruned."""
    failed = ot_trial is not None and ot_trial.state == optuna.trial.TrialState.FAIL
    errored = failed or (errored and (ot_trial is None or not ot_trial.state.is_finished()))
    pruned = ot_trial is not None and ot_trial.state == optuna.trial.TrialState.PRUNED
    return trial_status(rows[-1] if rows else {}, epochs, errored, ended=pruned)


@dataclass
class Sweep:
    """One or more loaded sweeps."""

    experiments: dict[str, Experiment]
    trials: pd.DataFrame
    history: pd.DataFrame

    @property
    def metric(self) -> str:
        return next(iter(self.experiments.values())).metric

    @property
    def mode(self) -> str:
        return next(iter(self.experiments.values())).mode

    @property
    def params(self) -> list[str]:
        """Hyperparameter columns (every searched or fixed training setting)."""
        keys: list[str] = []
        for e in self.experiments.values():
            keys += [k for k in e.space if k not in keys]
        return keys

    def best(self, metric: str | None = None, by: str | None = None, top: int = 1) -> pd.DataFrame:
        """The best trials by their final ``metric`` (validation), overall or per ``by`` value.

        Full-budget trials come first; a group where ASHA stopped every trial early falls back to its
        early-stopped ones (their ``status`` says so) rather than vanishing from the answer.

        Returns:
            A DataFrame of ``top`` rows (per group when ``by`` is given), best first.

        Raises:
            AnalysisError: ``metric`` is not a reported validation metric, ``by`` is not a column of the
                trials, or ``top`` is below 1.
        """
        metric = metric or self.metric
        if metric not in METRICS:
            raise AnalysisError(f"metric {metric!r}: not a validation metric the trials report; use one of "
                                f"{', '.join(METRICS)}")
        if top < 1:
            raise AnalysisError(f"top={top}: must be >= 1")
        column = f"last_{metric}"
        if by is None:
            return rank_trials(self.trials, column, metric_mode(metric), "status").head(top).reset_index(drop=True)
        if by not in self.trials:
            raise AnalysisError(f"--by {by}: no such column; try one of {', '.join(self.params)}")
        groups = [rank_trials(group, column, metric_mode(metric), "status").head(top)
                  for _, group in self.trials.groupby(by, sort=True)]
        return pd.concat(groups).reset_index(drop=True) if groups else self.trials.iloc[:0]

    def require_results(self) -> None:
        """Raise AnalysisError when no trial has reported the experiment's metric: nothing to rank or plot."""
        if self.best().empty:
            raise AnalysisError(f"{', '.join(self.experiments)}: no trial has reported {self.metric} yet, so there is "
                                "nothing to rank; each failed trial's error.txt says why")

    def importances(self, by: str | None = None) -> pd.DataFrame:
        """fANOVA importances of the searched hyperparameters over full-budget trials only.

        Returns:
            Columns ``group`` ("all" or a ``by`` value), ``param``, ``importance``; each group sums to 1.
            Groups with fewer than 3 full-budget trials, or nothing varied, are left out.

        Raises:
            AnalysisError: ``by`` is not a column of the trials.
        """
        if by is not None and by not in self.trials:
            raise AnalysisError(f"--by {by}: no such column; try one of {', '.join(self.params)}")
        full = self.trials[self.trials["status"] == "completed"]
        searched = [p for p in self.params if full[p].nunique() > 1] if not full.empty else []
        groups = [("all", full)] if by is None else [(str(k), g) for k, g in full.groupby(by)]
        rows = []
        for name, group in groups:
            params = [p for p in searched if p != by and group[p].nunique() > 1]
            if len(group) < 3 or not params:
                continue
            with quiet_optuna():  # no "study created" line per group
                study = optuna.create_study(direction="minimize" if self.mode == "min" else "maximize")
            for _, row in group.iterrows():
                distributions = {p: _distribution(self.trials[p]) for p in params}
                study.add_trial(optuna.trial.create_trial(
                    params={p: _plain(row[p]) for p in params}, distributions=distributions,
                    value=float(row[f"last_{self.metric}"])))
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), normalize=True)
            rows += [{"group": name, "param": p, "importance": v} for p, v in scores.items()]
        return pd.DataFrame(rows, columns=["group", "param", "importance"])


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _distribution(column: pd.Series) -> optuna.distributions.BaseDistribution:
    values = column.dropna()
    if values.dtype == object or values.dtype == bool or str(values.dtype) in ("string", "str"):
        return optuna.distributions.CategoricalDistribution(sorted({_plain(v) for v in values}, key=str))
    low, high = float(values.min()), float(values.max())
    if pd.api.types.is_integer_dtype(values):
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low > 10)


def _load_one(run_dir: Path) -> tuple[Experiment, pd.DataFrame, pd.DataFrame]:
    experiment = _read_experiment(run_dir)
    studies = _study_states(run_dir, experiment.name)
    trial_rows, history_rows = [], []
    params_files = sorted(run_dir.glob("*/params.json"))
    if not params_files and is_uri(experiment.storage):
        # With URI storage Ray writes the trial folders there; the driver's folder has the study alone.
        raise AnalysisError(f"{run_dir}: this sweep's trial folders are in "
                            f"{experiment.storage.rstrip('/')}/{experiment.name}; copy that folder here "
                            f"(for example with your cloud's sync command) and run again")
    for params_file in params_files:
        trial_dir = params_file.parent
        config = json.loads(params_file.read_text())
        result_file = trial_dir / "result.json"
        rows = []
        if result_file.is_file():
            for line in result_file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash; the lines before it are whole
        by_epoch = {}
        for r in rows:
            by_epoch[r["epoch"]] = r  # after a retry the same epoch may appear twice; keep the last
        rows = [by_epoch[e] for e in sorted(by_epoch)]
        trial_id = rows[-1]["trial_id"] if rows else trial_dir.name
        status = _status(rows, studies.get(trial_id), experiment.epochs, (trial_dir / "error.txt").exists())
        record = {"trial_id": trial_id, "status": status,
                  **{k: v for k, v in config.items() if k not in MACHINE_KEYS},
                  "epochs_run": rows[-1]["epoch"] if rows else 0,
                  "wall_s": rows[-1].get("time_total_s") if rows else None,
                  "node_ip": rows[-1].get("node_ip") if rows else None}
        for metric in METRICS:
            values = [r[metric] for r in rows if r.get(metric) is not None]
            record[f"last_{metric}"] = values[-1] if values else None
            best = (min if metric_mode(metric) == "min" else max)(values) if values else None
            record[f"best_{metric}"] = best
        trial_rows.append(record)
        for r in rows:
            history_rows.append({"trial_id": trial_id, "arch": config.get("arch"),
                                 **{k: v for k, v in r.items() if not isinstance(v, dict)}})
    trials = pd.DataFrame(trial_rows)
    history = pd.DataFrame(history_rows)
    return experiment, trials, history


def load(run_dirs: str | Path | Iterable[str | Path]) -> Sweep:
    """Load one run folder, or several (then every row carries its ``run`` name).

    Raises:
        AnalysisError: no folder, a folder that is not a run folder, two runs of the same name (their
            rows could not be told apart), or runs with no trial yet.
    """
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise AnalysisError("no run folder given; pass the folder that 'python -m tune sweep' printed")
    experiments, trial_frames, history_frames = {}, [], []
    for run_dir in dirs:
        experiment, trials, history = _load_one(run_dir)
        if experiment.name in experiments:
            raise AnalysisError(f"{run_dir}: a run named {experiment.name!r} is already loaded (the same folder "
                                f"twice, or two storages); analyze them one at a time")
        if len(dirs) > 1:
            trials.insert(0, "run", experiment.name)
            if not history.empty:
                history.insert(0, "run", experiment.name)
        experiments[experiment.name] = experiment
        trial_frames.append(trials)
        history_frames.append(history)
    trials = pd.concat(trial_frames, ignore_index=True)
    if trials.empty:
        raise AnalysisError(f"{', '.join(map(str, dirs))}: the sweep has no trials yet; wait for the first "
                            f"results or check the sweep's output for errors")
    return Sweep(experiments, trials, pd.concat(history_frames, ignore_index=True))
