"""Faults with real processes and real signals: killed trial workers, divergence, impossible resources, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray
import yaml

from .conftest import REPO, write_dataset
from .sweeps import load_study, read_trials_csv, run_cli, sweep_env, tiny_experiment

pytestmark = pytest.mark.slow


def _epochs(result_json: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in result_json.read_text().splitlines() if line.strip()]


def _sweep_with_kills(folder: Path, experiment: Path, kills: int, seed: int) -> tuple[Path, list[int]]:
    """Run a sweep while SIGKILLing the worker of a running trial ``kills`` times, each shortly after it
    reported an epoch; return the run folder and the killed pids once the sweep has finished."""
    with open(folder / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "tune", "sweep", str(experiment)], cwd=REPO,
                                  env=sweep_env(folder), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = folder / "runs" / yaml.safe_load(experiment.read_text())["name"]
    try:
        killed = _kill_workers_mid_epoch(driver, run_dir, kills, random.Random(seed))
        assert driver.wait(timeout=400) == 0, (folder / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    return run_dir, killed


def _kill_workers_mid_epoch(driver: subprocess.Popen, run_dir: Path, kills: int, rng: random.Random) -> list[int]:
    killed: list[int] = []
    deadline = time.monotonic() + 300
    while len(killed) < kills and time.monotonic() < deadline and driver.poll() is None:
        candidates = []
        for result in run_dir.glob("*/result.json"):
            lines = result.read_text().splitlines()
            if lines:
                last = json.loads(lines[-1])
                if last["epoch"] < last["config"]["epochs"] and last["pid"] not in killed:
                    candidates.append(last["pid"])
        if candidates:
            pid = rng.choice(candidates)
            time.sleep(rng.uniform(0.3, 0.8))  # into the next epoch
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return killed


@pytest.fixture
def slow_data(tmp_path):
    """Enough synthetic images that one epoch lasts a couple of seconds, so a kill lands mid-epoch."""
    write_dataset(tmp_path / "idx", n_train=9000, n_test=300)
    return tmp_path


def test_killed_trial_worker_is_retried_from_its_checkpoint(slow_data):
    experiment = tiny_experiment(slow_data, name="fault", num_samples=1, max_concurrent=1, epochs=4,
                                 scheduler={"type": "none"}, data={"dir": str(slow_data / "idx"), "val_size": 300},
                                 space={"arch": "late", "width": 8, "hidden": 64, "lr": 0.005})
    run_dir, killed = _sweep_with_kills(slow_data, experiment, kills=1, seed=0)
    assert len(killed) == 1
    (result,) = run_dir.glob("*/result.json")
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4], "history has a gap or a duplicated epoch"
    assert len({r["pid"] for r in rows}) == 2, "the trial did not continue in a new worker"
    trials = read_trials_csv(run_dir / "trials.csv")
    assert list(trials["trial_status"]) == ["completed"]
    (study_trial,) = load_study(run_dir, "fault").trials
    assert study_trial.state == optuna.trial.TrialState.COMPLETE


def test_chaos_random_worker_kills_leave_complete_gap_free_histories(slow_data):
    experiment = tiny_experiment(slow_data, name="chaos", num_samples=4, max_concurrent=2, epochs=3,
                                 max_failures=3, scheduler={"type": "none"},
                                 data={"dir": str(slow_data / "idx"), "val_size": 300},
                                 space={"arch": {"choice": ["late", "pixel"]}, "width": 8, "hidden": 64,
                                        "lr": {"loguniform": [2e-3, 1e-2]}})
    run_dir, killed = _sweep_with_kills(slow_data, experiment, kills=3, seed=1)
    assert len(killed) >= 2
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["trial_status"] == "completed").all()
    for trial_id in trials["trial_id"]:
        assert _epochs(run_dir / trial_id / "result.json") == [1, 2, 3], trial_id
    assert len([t for t in load_study(run_dir, "chaos").trials if t.state.is_finished()]) == 4


def test_divergence_ends_the_trial_with_zero_and_the_sweep_goes_on(tmp_path):
    experiment = tiny_experiment(tmp_path, name="diverge", num_samples=3, max_concurrent=1, epochs=3,
                                 scheduler={"type": "none"}, searcher={"type": "random"},
                                 space={"arch": "late", "width": 4, "hidden": 32, "optimizer": "sgd",
                                        "schedule": "constant", "lr": {"choice": [1e6, 0.05]}})
    proc = run_cli(tmp_path, "sweep", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = read_trials_csv(tmp_path / "runs" / "diverge" / "trials.csv")
    diverged = trials[trials["config/lr"] == 1e6]
    assert len(diverged) >= 1 and len(trials) == 3
    assert (diverged["trial_status"] == "diverged").all() and (diverged["val_joint_acc"] == 0.0).all()
    assert (diverged["epoch"] == 1).all()
    study = load_study(tmp_path / "runs" / "diverge", "diverge")
    for ot_trial in study.trials:
        if ot_trial.params["lr"] == 1e6:
            assert ot_trial.state == optuna.trial.TrialState.COMPLETE and ot_trial.value == 0.0


def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_trials_failing_before_their_first_report_get_rows_and_exit_1(tmp_path):
    """A trial that dies before reporting (here its model needs 400 TB, more than any address space) is
    in trials.csv with its config and error, a sweep in which no trial reported exits 1, and ``best`` and
    ``analyze`` say in one line that there is nothing to export or analyse."""
    experiment = tiny_experiment(tmp_path, name="unbuildable", num_samples=2, epochs=1, max_failures=0,
                                 scheduler={"type": "none"},
                                 space={"arch": "late", "lr": {"loguniform": [1e-3, 1e-2]}, "width": 1024,
                                        "hidden": 1_000_000_000})
    proc = run_cli(tmp_path, "sweep", str(experiment))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no trial reported a result" in proc.stderr and "can't allocate memory" in proc.stderr
    trials = read_trials_csv(tmp_path / "runs" / "unbuildable" / "trials.csv")
    assert len(trials) == 2 and (trials["trial_status"] == "errored").all()
    assert (trials["config/hidden"] == 1_000_000_000).all() and trials["config/lr"].between(1e-3, 1e-2).all()
    assert trials["error"].str.contains("can't allocate memory").all()
    exported = tmp_path / "best.yaml"
    proc = run_cli(tmp_path, "best", str(tmp_path / "runs" / "unbuildable"), "-o", str(exported))
    _one_line_exit_2(proc, "no trial has reported val_joint_acc")
    assert not exported.exists()
    proc = run_cli(tmp_path, "analyze", str(tmp_path / "runs" / "unbuildable"))
    _one_line_exit_2(proc, "no trial has reported val_joint_acc")
    assert not (tmp_path / "runs" / "unbuildable" / "analysis").exists()


def test_a_spent_time_budget_ends_the_sweep_with_cut_trials_stopped_early(tmp_path):
    # The budget counts from the start of Ray's loop, so it also pays for the first trial worker's start-up
    # (import torch, fetch the data): 8 s was too little for a first report on a loaded CI host (2026-12-01).
    experiment = tiny_experiment(tmp_path, name="hurried", num_samples=3, max_concurrent=1, epochs=400,
                                 time_budget_s=30, scheduler={"type": "none"},
                                 space={"arch": "late", "width": 4, "hidden": 16, "lr": {"loguniform": [1e-3, 1e-2]}})
    proc = run_cli(tmp_path, "sweep", str(experiment))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the time budget (30 s) ran out: 1 running trial(s) were cut short" in proc.stdout, proc.stdout[-2000:]
    assert "--resume" not in proc.stderr
    run_dir = tmp_path / "runs" / "hurried"
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 1 and trials["trial_status"].tolist() == ["stopped_early"]
    assert 1 <= trials["epoch"].iloc[0] < 400
    states = {t.user_attrs["ray_trial_id"]: t for t in load_study(run_dir, "hurried").trials}
    assert states[trials["trial_id"].iloc[0]].state == optuna.trial.TrialState.PRUNED
    for trial in states.values():
        assert trial.state != optuna.trial.TrialState.RUNNING
        if trial.state == optuna.trial.TrialState.FAIL:
            assert "not_started" in trial.user_attrs


def test_impossible_resources_fail_at_launch(tmp_path):
    experiment = tiny_experiment(tmp_path, name="greedy")
    proc = run_cli(tmp_path, "sweep", str(experiment), "--cpus-per-trial", "64", timeout=120)
    _one_line_exit_2(proc, "resources.cpu", "64", "CPUs")
    proc = run_cli(tmp_path, "sweep", str(experiment), "--gpus-per-trial", "0.5", timeout=120)
    _one_line_exit_2(proc, "resources.gpu")
    assert not (tmp_path / "runs" / "greedy").exists()


def test_missing_and_corrupt_data_and_unwritable_storage(tmp_path, cli_in_process):
    from tune.__main__ import main

    missing = tiny_experiment(tmp_path, name="nodata", data={"dir": str(tmp_path / "empty"), "download": False})
    _one_line_exit_2(run_cli(tmp_path, "sweep", str(missing)), "does not exist; point it at a folder")
    # The rest in this process, which skips an interpreter's start-up; none of them may start Ray.
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(cli_in_process(main, "sweep", str(missing)), "lacks Fashion-MNIST IDX files")
    write_dataset(tmp_path / "broken", n_train=100, n_test=20)
    (tmp_path / "broken" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    corrupt = tiny_experiment(tmp_path, name="corrupt", data={"dir": str(tmp_path / "broken")})
    _one_line_exit_2(cli_in_process(main, "sweep", str(corrupt)), "t10k-labels-idx1-ubyte.gz")
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = tiny_experiment(tmp_path, name="nowhere")
    _one_line_exit_2(cli_in_process(main, "sweep", str(unwritable), "--storage", str(tmp_path / "a-file" / "runs")),
                     "not writable")
    # Each size is fine alone; together they need more than the 1500 training images tiny data has.
    too_big = tiny_experiment(tmp_path, name="toobig", data={"dir": str(tmp_path / "idx"), "download": False,
                                                            "val_size": 1000, "train_subset": 1000})
    _one_line_exit_2(cli_in_process(main, "sweep", str(too_big)), "data: train_subset=1000")
    for name in ("nodata", "corrupt", "toobig"):
        assert not (tmp_path / "runs" / name).exists(), "a rejected sweep left a run folder behind"
    assert not ray.is_initialized()


def test_local_ray_binds_to_loopback():
    """Even when Ray was imported first (``tune.analysis`` imports it), as the CLI does."""
    code = ("import ray, tune.analysis; from tune.sweep import start_ray; start_ray(None)\n"
            "print(ray.get_runtime_context().gcs_address); print([n['NodeManagerAddress'] for n in ray.nodes()])\n"
            "ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
                               "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    gcs, nodes = proc.stdout.splitlines()[-2:]
    assert gcs.startswith("127.0.0.1:") and nodes == "['127.0.0.1']"


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nspace: {{arch: late}}\n")
    proc = run_cli(tmp_path, "sweep", str(evil))
    _one_line_exit_2(proc, "not valid YAML")
    assert not marker.exists()
