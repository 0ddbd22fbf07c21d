"""One real sweep (Ray Tune + OptunaSearch + ASHA, both designs) through the CLI, then checks on what it left."""

import os
import re
import subprocess
import sys
import textwrap

import optuna
import pandas as pd
import pytest

from dualnet import TrainConfig
from dualnet.train import load_config_file

from .conftest import REPO
from .sweeps import load_study, read_trials_csv

pytestmark = pytest.mark.slow


def test_sweep_writes_trials_dataframe(sweep):
    run_dir, _ = sweep
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 8
    assert set(trials["config/arch"]) == {"late", "pixel"}
    for column in ("trial_id", "config/lr", "config/width", "val_joint_acc", "val_class_acc", "val_sum_acc",
                   "epoch", "trial_status"):
        assert column in trials
    assert trials["val_joint_acc"].between(0, 1).all()
    assert (trials["node_ip"] == "127.0.0.1").all(), "a local sweep's Ray listened on a public address"
    assert set(trials["trial_status"]) <= {"completed", "stopped_early"}
    assert (trials.loc[trials["trial_status"] == "completed", "epoch"] == 2).all()
    parquet = pd.read_parquet(run_dir / "trials.parquet")
    assert list(parquet["trial_id"]) == list(trials["trial_id"])


def test_study_is_persisted_and_asha_stops_are_pruned(sweep):
    run_dir, _ = sweep
    trials = read_trials_csv(run_dir / "trials.csv").set_index("trial_id")
    study = load_study(run_dir, "tiny")
    assert len(study.trials) == 8
    stopped = trials[trials["trial_status"] == "stopped_early"]
    assert len(stopped) >= 1, "ASHA stopped nothing, so the pruned path went untested"
    for ot_trial in study.trials:
        row = trials.loc[ot_trial.user_attrs["ray_trial_id"]]
        assert ot_trial.params["lr"] == pytest.approx(row["config/lr"])
        if row["trial_status"] == "stopped_early":
            assert ot_trial.state == optuna.trial.TrialState.PRUNED
            assert ot_trial.intermediate_values[int(row["epoch"])] == pytest.approx(row["val_joint_acc"])
        else:
            assert ot_trial.state == optuna.trial.TrialState.COMPLETE
            assert ot_trial.value == pytest.approx(row["val_joint_acc"])


def test_best_config_is_the_best_full_budget_trial_and_trains(sweep):
    run_dir, _ = sweep
    trials = read_trials_csv(run_dir / "trials.csv")
    completed = trials[trials["trial_status"] == "completed"]
    (entry,) = load_config_file(run_dir / "best_config.yaml")
    config = TrainConfig.from_dict(entry)
    # Ties (common in a sweep this small) go to the smaller trial_id, whatever order the rows are in.
    best = completed.sort_values(["val_joint_acc", "trial_id"], ascending=[False, True]).iloc[0]
    assert config.arch == best["config/arch"] and config.lr == pytest.approx(best["config/lr"])
    assert config.epochs == 2 and config.hidden == 32


def test_output_is_a_clean_progress_table(sweep):
    _, proc = sweep
    out = proc.stdout + proc.stderr
    assert re.search(r"trial\s+arch\s+lr\s+width\s+epoch\s+val_joint_acc", proc.stdout)
    assert "Top trials by val_joint_acc" in proc.stdout
    assert "Traceback" not in out and "SIGTERM" not in out
    assert "Checkpoint successfully created" not in out
    assert "A new study created" not in out
    deprecations = [line for line in out.splitlines() if re.search("deprecat", line, re.I) and "ray" in line.lower()]
    assert not deprecations, deprecations


def test_a_trial_worker_stopped_inside_a_gc_callback_prints_nothing():
    """Ray's SIGTERM handler raises SystemExit wherever a trial worker is; inside a garbage-collection
    callback Python prints that as "Exception ignored" with Ray's traceback (once in about 20 CI runs of
    the sweep above). The same happens here, in a process of its own, where pytest's hook is absent."""
    script = textwrap.dedent("""
        import signal, weakref
        from tune.trainable import quiet_exits_in_callbacks
        quiet_exits_in_callbacks()
        quiet_exits_in_callbacks()  # a second trial in the same worker

        def sigterm_handler(signum, frame):  # as Ray's: SystemExit wherever the signal lands
            raise SystemExit(1)

        signal.signal(signal.SIGTERM, sigterm_handler)

        class Model:
            pass

        def stopped_here(ref):
            signal.raise_signal(signal.SIGTERM)

        model = Model()
        watch = weakref.ref(model, stopped_here)
        del model
        other = Model()
        broken = weakref.ref(other, lambda ref: 1 / 0)
        del other
        print("still running")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == "still running\n", proc.stderr
    assert "SystemExit" not in proc.stderr and "sigterm_handler" not in proc.stderr, proc.stderr
    assert "Exception ignored" in proc.stderr and "ZeroDivisionError" in proc.stderr, proc.stderr


def test_a_snapshot_is_written_only_after_the_previous_upload_finished(tmp_path):
    """Ray copies each experiment snapshot to storage in a background thread. Writing the next one
    into the staging folder during that copy once made a sweep log a traceback (a temporary file
    vanished mid-copy). A 64 MiB staged file keeps the first copy busy while the second snapshot comes."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from tune.sweep import upload_snapshots_one_at_a_time

    upload_snapshots_one_at_a_time()

    class LocalStaging(StorageContext):  # the real staging folder needs a running Ray session
        experiment_driver_staging_path = str(tmp_path / "staging")

    storage = LocalStaging(storage_path=str(tmp_path / "storage"), experiment_dir_name="exp")
    manager = _ExperimentCheckpointManager(storage=storage, checkpoint_period=0)
    os.makedirs(storage.experiment_driver_staging_path)
    (tmp_path / "staging" / "big.bin").write_bytes(os.urandom(64 << 20))
    upload_running_during_save = []

    def save():
        upload = storage.syncer._sync_process
        upload_running_during_save.append(bool(upload and upload.is_running))
        (tmp_path / "staging" / "state.txt").write_text(str(len(upload_running_during_save)))

    manager.sync_up_experiment_state(save, force=True)
    manager.sync_up_experiment_state(save, force=True)
    storage.syncer.wait()
    assert upload_running_during_save == [False, False]
    assert (tmp_path / "storage" / "exp" / "state.txt").read_text() == "2"


def test_grid_searcher_runs_each_design_once(tmp_path):
    """The replication recipe (experiments/seed.yaml) uses a grid over the designs with everything else fixed."""
    from .sweeps import run_cli, tiny_experiment

    experiment = tiny_experiment(tmp_path, name="grid", num_samples=2, epochs=1, searcher={"type": "grid"},
                                 scheduler={"type": "none"},
                                 space={"arch": {"choice": ["late", "pixel"]}, "width": 4, "hidden": 32, "lr": 0.003})
    proc = run_cli(tmp_path, "sweep", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = read_trials_csv(tmp_path / "runs" / "grid" / "trials.csv")
    assert sorted(trials["config/arch"]) == ["late", "pixel"]
    assert (trials["config/lr"] == 0.003).all()


def test_epoch_budget_stops_starting_trials_once_spent(tmp_path):
    """One trial at a time, 2 epochs each, 5 epochs of budget: after 4 epochs one more trial starts,
    after 6 none does, and the sweep counts as finished (no '--resume' advice)."""
    from .sweeps import run_cli, tiny_experiment

    experiment = tiny_experiment(tmp_path, name="budget", num_samples=20, max_concurrent=1, epoch_budget=5,
                                 scheduler={"type": "none"})
    proc = run_cli(tmp_path, "sweep", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = read_trials_csv(tmp_path / "runs" / "budget" / "trials.csv")
    assert len(trials) == 3 and (trials["epoch"] == 2).all()
    assert "the epoch budget (5) was spent after 3 of 20 trials" in proc.stdout
    assert "--resume" not in proc.stderr
    assert len(load_study(tmp_path / "runs" / "budget", "budget").trials) == 3


def test_epoch_budget_count_survives_the_searcher_state_a_resume_restores(tmp_path):
    from ray.tune.search import Searcher

    from tune.config import from_dict
    from tune.search import make_searcher

    experiment = from_dict({"name": "b", "epochs": 2, "epoch_budget": 3,
                            "space": {"arch": {"choice": ["late", "pixel"]}, "lr": {"loguniform": [1e-3, 1e-2]}}})
    searcher = make_searcher(experiment, tmp_path).searcher
    assert searcher.suggest("t1") is not None
    searcher.on_trial_complete("t1", {"epoch": 2, "val_joint_acc": 0.6, "training_iteration": 2})
    assert searcher.suggest("t2") is not None
    searcher.on_trial_result("t2", {"epoch": 1, "val_joint_acc": 0.5, "training_iteration": 1})
    searcher.on_trial_result("t2", {"epoch": 1, "val_joint_acc": 0.5, "training_iteration": 1})  # replayed
    assert searcher.epochs_spent() == 3
    assert searcher.suggest("t3") == Searcher.FINISHED
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = make_searcher(experiment, tmp_path).searcher
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.epochs_spent() == 3 and restored.suggest("t4") == Searcher.FINISHED


@pytest.mark.parametrize("rung_metric, second_trial", [({"metric": None}, "CONTINUE"),
                                                        ({"metric": "train_loss"}, "STOP"), ({}, "STOP")],
                         ids=["null: the experiment's metric", "train_loss", "default"])
def test_asha_ranks_rungs_by_the_scheduler_metric(rung_metric, second_trial):
    """The second trial at the first rung has the better accuracy and the worse training loss."""
    from ray.tune.experiment import Trial

    from tune.config import from_dict
    from tune.search import make_scheduler

    experiment = from_dict({"name": "rungs", "epochs": 4, "space": {"arch": "late"},
                            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2,
                                          **rung_metric}})
    scheduler = make_scheduler(experiment)
    first, second = Trial("__fake", stub=True), Trial("__fake", stub=True)
    for trial in (first, second):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, first, {"training_iteration": 1, "train_loss": 1.0,
                                                   "val_joint_acc": 0.1}) == "CONTINUE"
    assert scheduler.on_trial_result(None, second, {"training_iteration": 1, "train_loss": 2.0,
                                                    "val_joint_acc": 0.9}) == second_trial



def test_a_joined_cluster_short_of_gpus_gets_a_note_and_a_local_ray_an_error(capsys):
    from tune.config import ConfigError
    from tune.sweep import check_capacity

    asked = {"CPU": ("resources.cpu", 1), "GPU": ("resources.gpu", 0.25)}
    with pytest.raises(ConfigError, match="resources.gpu: each trial asks for 0.25 GPUs but the Ray cluster has 0"):
        check_capacity(asked, {"CPU": 8, "GPU": 0}, "trial")
    # An autoscaling cluster (GPU workers from zero nodes) adds the GPUs once trials ask for them.
    check_capacity(asked, {"CPU": 8, "GPU": 0}, "trial", joined=True)
    assert "trials wait until an autoscaler adds nodes" in capsys.readouterr().err


def test_study_and_result_files_are_copied_beside_the_trial_folders(tmp_path):
    import pyarrow.fs

    from tune.sweep import copy_run_files

    run_dir = tmp_path / "driver" / "run"
    run_dir.mkdir(parents=True)
    contents = {"experiment.yaml": "name: run\n", "optuna.journal": '{"op_code": 0}\n', "trials.csv": "trial_id\na\n"}
    for name, text in contents.items():
        (run_dir / name).write_text(text)
    storage = tmp_path / "bucket" / "runs" / "run"
    written = copy_run_files(run_dir, pyarrow.fs.LocalFileSystem(), str(storage))
    assert sorted(written) == sorted(str(storage / name) for name in contents)  # only what exists
    for name, text in contents.items():
        assert (storage / name).read_text() == text


def test_an_epoch_repeated_after_a_restore_reports_once_without_a_warning(tmp_path, recwarn):
    """A trial restored from its last checkpoint trains the epochs after it again; Optuna keeps the
    first report of each step and would warn about the second on the sweep's stderr."""
    from tune.config import from_dict
    from tune.search import make_searcher

    experiment = from_dict({"name": "repeat", "epochs": 3, "space": {"arch": "late",
                                                                     "lr": {"loguniform": [1e-3, 1e-2]}}})
    searcher = make_searcher(experiment, tmp_path).searcher
    assert searcher.suggest("t1") is not None
    result = {"val_joint_acc": 0.5, "training_iteration": 1, "epoch": 1}
    searcher.on_trial_result("t1", result)
    searcher.on_trial_result("t1", {**result, "val_joint_acc": 0.5})
    assert not [w for w in recwarn if "is already reported" in str(w.message)]
    assert load_study(tmp_path, "repeat").trials[0].intermediate_values == {1: 0.5}


def test_tpe_options_reach_the_optuna_sampler(tmp_path):
    from tune.config import from_dict
    from tune.search import make_searcher

    space = {"arch": "late", "lr": {"loguniform": [1e-3, 1e-2]}}
    plain = make_searcher(from_dict({"name": "plain", "space": space}), tmp_path).searcher._ot_study.sampler
    assert not plain._multivariate and not plain._constant_liar
    experiment = from_dict({"name": "joint", "space": space,
                            "searcher": {"type": "tpe", "multivariate": True, "constant_liar": True}})
    sampler = make_searcher(experiment, tmp_path).searcher._ot_study.sampler
    assert sampler._multivariate and sampler._constant_liar


def test_leaderboard_ranks_full_budget_trials_above_early_stopped_ones():
    from tune.config import from_dict
    from tune.sweep import leaderboard, pick_best, rank_trials

    trials = pd.DataFrame({"trial_id": ["stopped", "full-a", "full-b", "silent"],
                           "val_joint_acc": [0.9, 0.6, 0.8, None], "epoch": [1, 3, 3, 0],
                           "trial_status": ["stopped_early", "completed", "completed", "error"]})
    ranked = rank_trials(trials, "val_joint_acc", "max", "trial_status", with_partial=True)
    assert list(ranked["trial_id"]) == ["full-b", "full-a", "stopped"]
    assert list(rank_trials(trials, "val_joint_acc", "max", "trial_status")["trial_id"]) == ["full-b", "full-a"]
    experiment = from_dict({"name": "t", "epochs": 3, "space": {"arch": "late"}})
    assert pick_best(trials, experiment)["trial_id"] == "full-b"
    rows = leaderboard(trials, experiment).splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["full-b", "full-a", "stopped"]


def test_tied_trials_rank_the_same_whatever_order_they_were_read_in():
    from tune.sweep import rank_trials

    trials = pd.DataFrame({"trial_id": ["b2", "a1", "c3"], "val_joint_acc": [0.5, 0.5, 0.4],
                           "trial_status": ["completed"] * 3})
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        ranked = rank_trials(trials.iloc[order], "val_joint_acc", "max", "trial_status")
        assert list(ranked["trial_id"]) == ["a1", "b2", "c3"]
