"""Run a sweep: check everything, start (or join) Ray, run the Tuner, write the results.

Run folder (``<storage>/<name>``): Ray Tune's own experiment state and trial
folders, plus ``experiment.yaml`` (the validated experiment), ``optuna.journal``
(the Optuna study), and at the end ``trials.csv``, ``trials.parquet`` and
``best_config.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from dualnet import load_data
from dualnet.files import atomic_path, first_line, write_atomic

from .config import ConfigError, Experiment, load_experiment

EXPERIMENT_FILE = "experiment.yaml"
STUDY_FILE = "optuna.journal"
RESULT_FILES = ("trials.csv", "trials.parquet", "best_config.yaml")
TIME_BUDGET_MARKER = ".time_budget_spent"
# While "0", Ray binds to 127.0.0.1 instead of the machine's public address.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class SweepError(Exception):
    """A problem the user can fix (bad storage, wrong resume folder, too few resources); one line."""


@dataclass
class SweepOutcome:
    run_dir: str
    trials: pd.DataFrame
    best_config: dict[str, Any] | None
    wall_s: float
    # False when Ctrl+C cut the sweep short: some trials are left for --resume.
    finished: bool = True


def is_uri(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def run_location(experiment: Experiment) -> tuple[str, Path]:
    """Return (Ray storage_path, local folder for the study and result files).

    A local storage path holds everything. For a URI, Ray writes trials there and
    the study and result files stay in ``./runs/<name>`` on the driver.
    """
    if is_uri(experiment.storage):
        return experiment.storage, Path("runs").resolve() / experiment.name
    storage = Path(experiment.storage.removeprefix("file://")).expanduser().resolve()
    return str(storage), storage / experiment.name


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Hold Optuna's log at warnings inside the block: its "A new study created" line is noise where
    the harness says itself where the study is, or builds throwaway studies."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def study_storage(run_dir: Path):
    """The study's journal file in the run folder (an Optuna storage); ``optuna.load_study`` and
    optuna-dashboard open it."""
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run_dir / STUDY_FILE)))


def _prepare_run_dir(experiment: Experiment, run_dir: Path, resume: bool) -> None:
    """Check the run folder against ``resume`` and make sure it is writable.

    Raises:
        SweepError: an existing sweep without ``--resume``, nothing to resume, a
            different experiment's folder, or an unwritable path.
    """
    saved = run_dir / EXPERIMENT_FILE
    if resume:
        if not saved.is_file():
            raise SweepError(f"--resume: {run_dir} holds no sweep ({EXPERIMENT_FILE} missing); "
                             f"run without --resume to start one")
        try:
            previous = load_experiment(saved)
        except ConfigError as exc:
            raise SweepError(f"--resume: the saved experiment is unreadable: {exc}") from None
        if _identity(previous) != _identity(experiment):
            changed = [k for k in _identity(experiment) if _identity(previous)[k] != _identity(experiment)[k]]
            raise SweepError(f"--resume: {run_dir} belongs to a different experiment (differs in "
                             f"{', '.join(changed)}); a resumed sweep keeps what it started with, so give the "
                             f"same experiment file and flags, or another --name")
        return
    if saved.exists():
        raise SweepError(f"{run_dir} already holds a sweep; pass --resume to continue it, or choose another "
                         f"--name or --storage")
    # Probe the storage root, not the run folder: a rejected sweep must leave no run folder behind.
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = run_dir.parent / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"storage {run_dir.parent} is not writable ({exc.strerror or exc}); pass --storage DIR "
                         f"with a folder you can write") from None


def _identity(experiment: Experiment) -> dict[str, Any]:
    """The parts of an experiment that a resumed sweep must share with the original. The limits,
    budgets and resources are here because Ray restores them with the searcher, the run config and
    each trial's threads and device, so a new value would be silently ignored."""
    d = experiment.to_dict()
    return {k: d[k] for k in ("name", "space", "metric", "mode", "num_samples", "epochs", "searcher",
                              "scheduler", "data", "seed", "max_concurrent", "epoch_budget", "time_budget_s",
                              "max_failures", "resources")}


def trial_resources(experiment: Experiment) -> dict[str, float]:
    """What Ray reserves for each trial (fractional GPUs pack several trials on one GPU)."""
    return {"cpu": experiment.resources.cpu, "gpu": experiment.resources.gpu}


def trial_constants(experiment: Experiment) -> dict[str, Any]:
    """Per-trial settings that are not searched: fixed hyperparameters and the harness's own."""
    fixed = {k: p.args[0] for k, p in experiment.space.items() if p.fixed}
    threads = max(1, int(experiment.resources.cpu))
    device = "cuda" if experiment.resources.gpu > 0 else "cpu"
    return {**fixed, "epochs": experiment.epochs, "threads": threads, "device": device}


def check_capacity(asked: dict[str, tuple[str, float]], available: dict[str, float], unit: str,
                   joined: bool = False) -> None:
    """Fail at launch, not by hanging, when one ``unit`` of work (a trial, a run) needs more than the Ray
    cluster has. Sweeps and ``tune confirm`` share this rule.

    Args:
        asked: Ray resource ("CPU", "GPU") -> (the setting that asks, how much one unit asks for).
        joined: the command joined a running cluster. That one may autoscale (say, GPU workers that
            start at zero nodes), so there a shortfall only prints a note and the work waits for nodes.

    Raises:
        ConfigError: a local Ray (which never grows) has too little for one unit.
    """
    for ray_key, (setting, amount) in asked.items():
        have = available.get(ray_key, 0)
        if amount > 0 and amount > have:
            shortfall = f"{setting}: each {unit} asks for {amount:g} {ray_key}s but the Ray cluster has {have:g}"
            if not joined:
                raise ConfigError(f"{shortfall}; ask for at most that, or join a bigger Ray cluster")
            print(f"note: {shortfall} now; {unit}s wait until an autoscaler adds nodes with them "
                  f"(Ctrl+C stops them)", file=sys.stderr)


# Settings the harness sets per trial; they describe the machine, not the config worth keeping.
MACHINE_KEYS = ("threads", "device")


def trial_status(last: dict, epochs: int, errored: bool, ended: bool) -> str:
    """Classify a trial from its last reported result; the one rule the sweep and the analysis share.

    ``ended`` says the trial will not run again (the scheduler stopped it, or the sweep finished).
    Returns ``diverged``, ``errored``, ``completed``, ``stopped_early`` or ``running``.
    """
    if last.get("status") == "diverged":
        return "diverged"
    if errored:
        return "errored"
    if last.get("epoch", 0) >= epochs:
        return "completed"
    return "stopped_early" if ended else "running"


def summarize(results, experiment: Experiment) -> pd.DataFrame:
    """One row per trial: Ray's last result with ``config/*`` columns, plus ``error`` and ``trial_status``.

    A trial that failed before its first report (say, out of memory) has a row too, with its
    config and error and no metrics.
    """
    frame = results.get_dataframe()
    reported = set(frame["trial_id"]) if "trial_id" in frame else set()
    errors, unreported = {}, []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or posixpath.basename(result.path)
        if result.error:
            errors[trial_id] = repr(result.error)
        if trial_id not in reported:
            # Ray keeps no config for such a trial in its result, but wrote it to the trial folder at the start.
            try:
                with result.filesystem.open_input_stream(posixpath.join(result.path, "params.json")) as f:
                    config = json.loads(f.read())
            except OSError:  # the trial never started (it was still pending when the sweep ended): no row
                continue
            unreported.append({"trial_id": trial_id, **{f"config/{k}": v for k, v in config.items()}})
    if unreported:
        frame = pd.concat([frame, pd.DataFrame(unreported)], ignore_index=True)
    if frame.empty:
        return pd.DataFrame(columns=["trial_id", "error", "trial_status"])
    frame["error"] = [errors.get(trial_id, "") for trial_id in frame["trial_id"]]
    frame["trial_status"] = [trial_status(row, experiment.epochs, bool(row["error"]), ended=True)
                             for row in frame.to_dict("records")]
    return frame


def rank_trials(trials: pd.DataFrame, column: str, mode: str, status_column: str,
                with_partial: bool = False) -> pd.DataFrame:
    """Trials that have a ``column`` value, best first: those that ran the full budget (``status_column``
    is ``completed``), then, if ``with_partial`` or if none did, the others (say, stopped early).

    ``sweep`` ranks its summary by this and ``tune.analysis`` its loaded trials, so the two always
    pick the same best trial, and a leaderboard never puts a trial scored after one epoch above the
    full-budget trial that ``best_config.yaml`` holds. Ties go to the smaller ``trial_id``: the two
    read their trials in different orders, so the order of the rows must not decide.
    """
    if column not in trials:  # no trial has reported yet
        return trials.iloc[:0]
    scored = trials[trials[column].notna()].sort_values([column, "trial_id"], ascending=[mode == "min", True])
    full = scored[scored[status_column] == "completed"]
    if full.empty:
        return scored
    return pd.concat([full, scored[scored[status_column] != "completed"]]) if with_partial else full


def pick_best(trials: pd.DataFrame, experiment: Experiment) -> pd.Series | None:
    """The best trial by its final metric, preferring trials that ran the full budget; None if none has one."""
    ranked = rank_trials(trials, experiment.metric, experiment.mode, "trial_status")
    return ranked.iloc[0] if not ranked.empty else None


def best_config(row: pd.Series, experiment: Experiment) -> dict[str, Any]:
    """The best trial's training settings (``config``) and where they came from (``meta``)."""
    config = {k.removeprefix("config/"): v for k, v in row.items() if k.startswith("config/")}
    config = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()
              if k not in MACHINE_KEYS}
    return {"config": config, "meta": {"experiment": experiment.name, "trial_id": row["trial_id"],
                               experiment.metric: float(row[experiment.metric]), "epochs_run": int(row["epoch"]),
                               "note": "validation metric from the sweep; confirm on the test set"}}


def write_config_file(path: Path, configs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write training configs atomically in the format ``dualnet train --config`` and ``tune confirm`` read:
    one mapping for a single config, ``configs:`` for several, with ``meta`` beside them."""
    body = {"configs": configs, "meta": meta} if len(configs) > 1 else {**configs[0], "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "# Train with: python -m dualnet train --config THIS_FILE, or check with python -m tune "
                       "confirm THIS_FILE\n" + yaml.safe_dump(body, sort_keys=False))


def leaderboard(trials: pd.DataFrame, experiment: Experiment, top: int = 5) -> str:
    """A plain-text table of the ``top`` trials by final metric, full-budget trials first (``rank_trials``)."""
    if trials.empty or experiment.metric not in trials:
        return "no trial reported a result"
    columns = ["trial_id", "config/arch", "config/lr", "config/width", "config/hidden", "epoch",
               "val_class_acc", "val_sum_acc", "val_joint_acc", "trial_status"]
    columns = [c for c in columns if c in trials]
    ranked = rank_trials(trials, experiment.metric, experiment.mode, "trial_status", with_partial=True)
    ranked = ranked.head(top)[columns]
    ranked = ranked.rename(columns=lambda c: c.removeprefix("config/"))
    return ranked.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def write_results(run_dir: Path, trials: pd.DataFrame, best: dict[str, Any] | None) -> None:
    """Write trials.csv / trials.parquet / best_config.yaml, each atomically."""
    for name, writer in (("trials.csv", lambda p: trials.to_csv(p, index=False)),
                         ("trials.parquet", lambda p: trials.to_parquet(p, index=False))):
        with atomic_path(run_dir / name) as tmp:
            writer(tmp)
    if best is not None:
        write_config_file(run_dir / "best_config.yaml", [best["config"]], best["meta"])


def copy_run_files(run_dir: Path, filesystem, experiment_path: str) -> list[str]:
    """Copy the run's study and result files from the driver's ``run_dir`` to ``experiment_path`` on
    ``filesystem`` (a pyarrow filesystem: where Ray put the trial folders), so that they outlive the
    driver, as on a Ray job whose cluster is torn down afterwards.

    Returns:
        The paths written, on ``filesystem``.

    Raises:
        OSError: the storage refused a write.
    """
    import pyarrow.fs

    filesystem.create_dir(experiment_path, recursive=True)
    written = []
    for name in (EXPERIMENT_FILE, STUDY_FILE, *RESULT_FILES):
        if (run_dir / name).exists():
            target = posixpath.join(experiment_path, name)
            pyarrow.fs.copy_files(str(run_dir / name), target, destination_filesystem=filesystem)
            written.append(target)
    return written


ORPHANED = "orphaned"


def _close_open_study_trials(run_dir: Path, experiment: Experiment, cut_by_time: frozenset[str] = frozenset(),
                             never_started: frozenset[str] = frozenset()) -> None:
    """Close every study trial still RUNNING once the sweep has ended, in one pass over the study.

    - Cut off mid-run by the time budget (``cut_by_time``): PRUNED, so its last reported values stand.
    - Pending when the time budget ran out (``never_started``): FAIL, labelled ``not_started``.
    - Any other is an orphan, FAIL and labelled ``orphaned``: if the driver dies after Optuna's
      ``ask`` but before Ray's next state snapshot, the resumed sweep never hears of that trial
      again (Ray starts a replacement), and left alone it would stay RUNNING forever.
    """
    import optuna

    storage = study_storage(run_dir)
    study = optuna.load_study(study_name=experiment.name, storage=storage)
    study_id = storage.get_study_id_from_name(experiment.name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        ray_id = trial.user_attrs.get("ray_trial_id")
        if ray_id in cut_by_time:
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            continue
        label = (("not_started", "the time budget ran out before this trial started") if ray_id in never_started
                 else (ORPHANED, "the sweep driver died before Ray recorded this trial; a new trial replaced it"))
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), *label)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _cut_off(trials: pd.DataFrame, run_dir: Path, experiment: Experiment) -> pd.Series:
    """Which trials the sweep's end cut off mid-run (Ctrl+C or the time budget).

    Ray ends such trials TERMINATED, like the ones that finished; they differ in having stopped
    short of the full budget without the scheduler having stopped them (those are PRUNED in the study).
    """
    import optuna

    if trials.empty:
        return pd.Series(dtype=bool)
    study = optuna.load_study(study_name=experiment.name, storage=study_storage(run_dir))
    pruned = {t.user_attrs.get("ray_trial_id")
              for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))}
    return (trials["trial_status"] == "stopped_early") & ~trials["trial_id"].isin(pruned)


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds where Ray would retry for minutes: a ``HOST:PORT`` address that is malformed or
    where nothing accepts a connection. ``auto``, ``local`` and ``ray://`` addresses are left to Ray.

    Raises:
        ConfigError: naming the address and what to do about it.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # http://HEAD:8265 is for 'ray job submit'
        raise ConfigError(f"Ray address {address!r} (--address or $RAY_ADDRESS): expected HOST:PORT of the head "
                          f"node, as 'ray start --head' prints it (say 10.0.0.5:6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"Ray address {address!r} (--address or $RAY_ADDRESS): nothing answers there "
                          f"({exc.strerror or exc}); start the cluster with 'ray start --head', or fix the "
                          f"address") from None


def ray_preflight(address: str | None, asked: dict[str, tuple[str, float]], unit: str) -> bool:
    """The checks that need no Ray: run before the data loads and Ray starts, so that a mistake costs
    one line and no wait. Sweeps and ``tune confirm`` share them.

    Returns:
        True if this process has no Ray yet and must start one (or join ``address``) itself.

    Raises:
        ConfigError: a bad or silent ``address`` (``check_ray_address``), or, for a local Ray, more
            than this machine has for one ``unit`` (``check_capacity``).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        check_ray_address(address)
    else:
        import torch

        # A local Ray sees exactly these; checking now keeps the error to one line, before Ray's banner.
        check_capacity(asked, {"CPU": os.cpu_count() or 1, "GPU": torch.cuda.device_count()}, unit)
    return True


def start_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local Ray whose every port binds to 127.0.0.1.

    Raises:
        ConfigError: Ray could not join ``address``.
    """
    import ray

    if address:
        try:
            ray.init(address=address, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"Ray address {address!r} (--address or $RAY_ADDRESS): {first_line(exc)}") from None
        return
    if LOCAL_ONLY_ENV not in os.environ:
        from ray._private import ray_constants

        # Ray's processes read this when they start. Ray itself read it when it was imported, which
        # may have been before this call (a caller that imported Ray first), so set its copy as well.
        os.environ[LOCAL_ONLY_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1", logging_level="WARNING")


def upload_snapshots_one_at_a_time() -> None:
    """Make Ray Tune finish uploading one experiment snapshot before it writes the next one.

    Ray writes each snapshot (experiment state, then the searcher's pickle through a temporary
    file and a rename) into a staging folder that a background thread may still be copying to
    storage from the snapshot before. When that copy lists the temporary file and then finds it
    renamed, Ray logs "Saving experiment state to storage ... failed" with a traceback, and the
    copy in storage can mix two snapshots. With a snapshot after every trial checkpoint
    (``num_to_keep=1`` below) this hit about one small sweep in 25 on 2 cores. Waiting for the
    previous upload costs nothing when it has finished, which it almost always has.
    """
    try:
        from ray.tune.execution.experiment_state import _ExperimentCheckpointManager as manager
    except ImportError:  # a Ray without this class stages snapshots differently; nothing to fix
        return
    sync_up = manager.sync_up_experiment_state
    if getattr(sync_up, "waits_for_previous_upload", False):
        return

    def sync_up_after_previous_upload(self, save_fn, force=False, wait=False):
        def save_after_previous_upload():
            syncer = getattr(self._storage, "syncer", None)
            if syncer is not None:
                try:
                    syncer.wait()
                except Exception:  # Ray reports a failed upload and carries on; so do we
                    logging.getLogger("ray.tune").error("uploading the last experiment snapshot failed",
                                                        exc_info=True)
            save_fn()
        return sync_up(self, save_after_previous_upload, force=force, wait=wait)

    sync_up_after_previous_upload.waits_for_previous_upload = True
    manager.sync_up_experiment_state = sync_up_after_previous_upload


def run_sweep(experiment: Experiment, address: str | None = None, resume: bool = False,
              verbose: bool = True) -> SweepOutcome:
    """Run (or resume) a sweep end to end and write its result files.

    Returns:
        A ``SweepOutcome`` with the run folder, the trials DataFrame, the best config and whether the
        sweep finished (False after Ctrl+C, with trials left for ``resume``).

    Raises:
        SweepError: bad storage or a wrong resume folder.
        DataError: the dataset is missing or damaged.
        ConfigError: ``data.val_size`` and ``data.train_subset`` ask for more images than the dataset has,
            one trial asks for more than a local Ray has, or no Ray cluster answers at ``address``.
    """
    storage_path, run_dir = run_location(experiment)
    _prepare_run_dir(experiment, run_dir, resume)

    # Ray reads these at import and Tuner creation; keep bookkeeping proportional to the concurrency.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", str(experiment.max_concurrent))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # With num_to_keep=1 every trial checkpoint forces an experiment snapshot, which also syncs the
    # driver's result.json files to storage. Without it, a trial retried after a crash copies back a
    # stale result.json and its history loses epochs. The warning about that frequency is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    from ray import tune

    from .progress import ProgressTable
    from .search import TimeBudgetStopper, make_scheduler, make_searcher
    from .trainable import train_trial

    upload_snapshots_one_at_a_time()

    started = time.perf_counter()
    asked = {"CPU": ("resources.cpu", experiment.resources.cpu), "GPU": ("resources.gpu", experiment.resources.gpu)}
    own_ray = ray_preflight(address, asked, "trial")
    try:
        data = load_data(experiment.data.dir, download=experiment.data.download, val_size=experiment.data.val_size,
                         seed=experiment.data.seed, train_subset=experiment.data.train_subset)
    except ValueError as exc:  # sizes that only the dataset's own size rules out
        raise ConfigError(f"data: {exc}") from None
    if own_ray:
        start_ray(address)
    try:
        check_capacity(asked, ray.cluster_resources(), "trial", joined=bool(address))
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and not is_uri(experiment.storage):
            print(f"note: {len(alive)} nodes share this sweep; storage {storage_path} must be a shared mount "
                  f"visible to every node, or pass --storage s3://... / gs://...", file=sys.stderr)
        if not resume:
            run_dir.mkdir(parents=True, exist_ok=True)
        trainable = tune.with_resources(tune.with_parameters(train_trial, data=data), trial_resources(experiment))
        if resume:
            tuner = tune.Tuner.restore(str(Path(storage_path) / experiment.name) if not is_uri(storage_path)
                                       else f"{storage_path.rstrip('/')}/{experiment.name}",
                                       trainable=trainable, resume_unfinished=True, resume_errored=True)
            # The restored run config brings back the progress table pickled at the first launch, with
            # that launch's --quiet and start time; this launch's must win. Tuner has no public getter.
            for callback in tuner._local_tuner.get_run_config().callbacks or ():
                if isinstance(callback, ProgressTable):
                    callback.restart(enabled=verbose)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=trial_constants(experiment),
                # No metric here: the searcher and the scheduler each carry their own, which may differ.
                tune_config=tune.TuneConfig(
                    search_alg=make_searcher(experiment, run_dir), scheduler=make_scheduler(experiment),
                    num_samples=experiment.num_samples,
                    reuse_actors=True, trial_dirname_creator=lambda trial: trial.trial_id),
                run_config=tune.RunConfig(
                    name=experiment.name, storage_path=storage_path, verbose=0,
                    stop=TimeBudgetStopper(experiment.time_budget_s, run_dir / TIME_BUDGET_MARKER)
                    if experiment.time_budget_s is not None else None,
                    callbacks=[ProgressTable(experiment, enabled=verbose)],
                    failure_config=tune.FailureConfig(max_failures=experiment.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
            # Written only once the Tuner has saved its own state beside it: this file is what makes the
            # folder a sweep that --resume can continue, so no earlier failure may leave it behind.
            write_atomic(run_dir / EXPERIMENT_FILE, yaml.safe_dump(experiment.to_dict(), sort_keys=False))
        (run_dir / TIME_BUDGET_MARKER).unlink(missing_ok=True)
        results = tuner.fit()
    finally:
        if own_ray:
            ray.shutdown()
    trials = summarize(results, experiment)
    epochs_spent = int(trials["epoch"].sum()) if "epoch" in trials else 0
    budget_spent = experiment.epoch_budget is not None and epochs_spent >= experiment.epoch_budget
    cut_off = _cut_off(trials, run_dir, experiment)
    never_started = {posixpath.basename(r.path) for r in results} - set(trials.get("trial_id", []))
    # A spent time budget is the sweep's end: what it cut off counts as stopped early, and nothing resumes.
    time_spent = (run_dir / TIME_BUDGET_MARKER).exists()
    finished = time_spent or (not cut_off.any() and not never_started and
                              (len(results) >= experiment.num_samples or budget_spent))
    if finished:
        # Only now may open study trials be closed; after Ctrl+C the cut-off trials are RUNNING in
        # the study too, and continue on --resume. (Unless the time budget ended the sweep, a finished
        # sweep has nothing cut off or never started.)
        _close_open_study_trials(run_dir, experiment, frozenset(trials.loc[cut_off, "trial_id"]),
                                 frozenset(never_started))
    else:
        trials.loc[cut_off, "trial_status"] = "unfinished"
    best_row = pick_best(trials, experiment)
    best = best_config(best_row, experiment) if best_row is not None else None
    write_results(run_dir, trials, best)
    if is_uri(experiment.storage):
        try:
            copy_run_files(run_dir, results.filesystem, results.experiment_path)
        except OSError as exc:
            print(f"warning: the study and result files stay only in {run_dir}: copying them to "
                  f"{experiment.storage} failed ({exc})", file=sys.stderr)
    wall_s = time.perf_counter() - started
    if verbose:
        print(f"\nTop trials by {experiment.metric} (validation):")
        print(leaderboard(trials, experiment))
        counts = trials["trial_status"].value_counts().to_dict() if not trials.empty else {}
        print(f"\n{len(trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}), {epochs_spent} epochs "
              f"in {wall_s / 60:.1f} min; results in {run_dir}")
        if budget_spent and len(results) < experiment.num_samples:
            print(f"the epoch budget ({experiment.epoch_budget}) was spent after {len(results)} of "
                  f"{experiment.num_samples} trials; no more were started")
        if time_spent:
            print(f"the time budget ({experiment.time_budget_s:g} s) ran out: {int(cut_off.sum())} running trial(s) "
                  f"were cut short and count as stopped early; {len(never_started)} pending trial(s) never started")
        print(f"study: optuna.load_study(study_name={experiment.name!r}, storage=JournalStorage("
              f"JournalFileBackend({str(run_dir / STUDY_FILE)!r})))")
    if not finished:  # printed even with --quiet: the exit code alone does not say what to do next
        print(f"the sweep stopped before all {experiment.num_samples} trials finished; "
              f"continue it with --resume", file=sys.stderr)
    return SweepOutcome(str(run_dir), trials, best, wall_s, finished)
