"""Searcher and scheduler construction, and the fix for ASHA-stopped trials in Optuna."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

from .config import Experiment, metric_mode
from .sweep import quiet_optuna, study_storage



class BudgetAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about trials the scheduler stopped early,
    and that stops suggesting trials once an epoch budget is spent.

    Ray reports an ASHA-stopped trial as complete with its low-budget score, which
    would teach TPE (and fANOVA) that a 1-epoch score is a final one. Here a trial
    that ends before ``full_epochs`` without diverging becomes PRUNED in the study,
    keeping its per-epoch intermediate values. A diverged trial stays COMPLETE with
    its reported worst score (0 accuracy, infinite loss), so the searcher learns to avoid
    that region.

    With ``epoch_budget``, ``suggest`` answers FINISHED once the trials together have
    reported that many epochs; trials already running go on to their end. The count
    lives in the searcher's state, which Ray saves with each experiment snapshot, so a
    resumed sweep keeps it.
    """

    def __init__(self, *args: Any, full_epochs: int, epoch_budget: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._full_epochs = full_epochs
        self._epoch_budget = epoch_budget
        self._epochs_reported: dict[str, int] = {}

    def epochs_spent(self) -> int:
        """Epochs the trials have reported so far; an epoch a resumed trial repeats counts once."""
        return sum(self._epochs_reported.values())

    def _count(self, trial_id: str, result: dict | None) -> None:
        if result and result.get("epoch") is not None:
            self._epochs_reported[trial_id] = max(self._epochs_reported.get(trial_id, 0), int(result["epoch"]))

    def suggest(self, trial_id: str) -> dict | str | None:
        if self._epoch_budget is not None and self.epochs_spent() >= self._epoch_budget:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        # Lets anyone reading the study find the Ray trial (and its folder) behind each Optuna trial.
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._count(trial_id, result)
        with warnings.catch_warnings():
            # A trial retried or resumed from its last checkpoint repeats the epochs after it, and Optuna
            # warns that it keeps the first report of each; training is deterministic, so they are equal.
            warnings.filterwarnings("ignore", message="The reported value is ignored because this `step",
                                    category=UserWarning)
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._count(trial_id, result)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and self._ot_study.get_trials(deepcopy=False)[ot_trial.number].state.is_finished():
            # A sweep resumed from a snapshot taken just before this trial ended: the study already
            # holds its outcome, and telling it twice would fail.
            self._completed_trials.add(trial_id)
            return
        stopped_early = (result is not None and not error and result.get("status") != "diverged"
                         and result.get("epoch", self._full_epochs) < self._full_epochs)
        if stopped_early and trial_id not in self._completed_trials:
            # Ray skips on_trial_result for the result that triggered the stop; keep it as
            # the pruned trial's last intermediate value.
            if result.get(self.metric) is not None:
                ot_trial.report(result[self.metric], result["epoch"])
            try:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            except RuntimeError:
                # Optuna's grid sampler calls study.stop() once the last grid point is told, which
                # raises outside study.optimize; the trial's state is stored before that.
                pass
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def optuna_space(experiment: Experiment) -> dict[str, optuna.distributions.BaseDistribution]:
    """Return the sampled hyperparameters as Optuna distributions (fixed ones are left out,
    except ``arch`` when nothing else is sampled)."""
    space = {}
    for key, param in experiment.space.items():
        if param.distribution == "choice":
            space[key] = CategoricalDistribution(param.args)
        elif param.distribution == "uniform":
            space[key] = FloatDistribution(*param.args)
        elif param.distribution == "loguniform":
            space[key] = FloatDistribution(*param.args, log=True)
        elif param.distribution == "int":
            space[key] = IntDistribution(*param.args)
    if not space:
        # Nothing is searched (a fixed recipe): Optuna still needs one distribution to record trials.
        space["arch"] = CategoricalDistribution(experiment.space["arch"].args)
    return space


def make_searcher(experiment: Experiment, run_dir: Path) -> ConcurrencyLimiter:
    """A seeded TPE, random or grid Optuna searcher, persisted in the run folder, behind a concurrency limit."""
    if experiment.searcher.type == "tpe":
        sampler = optuna.samplers.TPESampler(seed=experiment.seed,
                                             n_startup_trials=experiment.searcher.n_startup_trials,
                                             multivariate=experiment.searcher.multivariate,
                                             constant_liar=experiment.searcher.constant_liar)
    elif experiment.searcher.type == "grid":
        grid = {key: param.args for key, param in experiment.space.items() if param.distribution == "choice"}
        sampler = optuna.samplers.GridSampler(grid, seed=experiment.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=experiment.seed)
    with quiet_optuna():  # the sweep prints how to load its study
        searcher = BudgetAwareOptunaSearch(space=optuna_space(experiment), sampler=sampler,
                                           metric=experiment.metric, mode=experiment.mode,
                                           study_name=experiment.name, storage=study_storage(run_dir),
                                           full_epochs=experiment.epochs, epoch_budget=experiment.epoch_budget)
    return ConcurrencyLimiter(searcher, max_concurrent=experiment.max_concurrent)


def make_scheduler(experiment: Experiment) -> TrialScheduler:
    """ASHA ranking each rung by ``scheduler.metric`` (the experiment's metric when that is null), or plain FIFO."""
    if experiment.scheduler.type == "asha":
        metric = experiment.scheduler.metric or experiment.metric
        return ASHAScheduler(time_attr="training_iteration", max_t=experiment.epochs,
                             metric=metric, mode=metric_mode(metric),
                             grace_period=experiment.scheduler.first_rung(experiment.epochs),
                             reduction_factor=experiment.scheduler.reduction_factor)
    return FIFOScheduler()


class TimeBudgetStopper(TimeoutStopper):
    """Ray's time budget, which also leaves ``marker`` behind when the budget runs out.

    A spent budget and Ctrl+C end Ray's loop alike, with every trial TERMINATED; the marker is how
    the sweep tells them apart. Ray pickles the stopper with the run, so a resumed sweep spends
    what is left of the budget, and the marker path comes back with it.
    """

    def __init__(self, seconds: float, marker: Path):
        super().__init__(seconds)
        self.marker = Path(marker)

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent:
            self.marker.touch()
        return spent
