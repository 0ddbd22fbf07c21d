"""Killing the sweep driver with SIGKILL mid-sweep, then ``--resume``: nothing finished is re-run or lost."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import ray
from optuna.trial import TrialState

from tune.sweep import ORPHANED

from .conftest import REPO
from .sweeps import load_study, read_trials_csv, run_cli, sweep_env, tiny_experiment

pytestmark = pytest.mark.slow


def _finished_trials(log_text: str) -> list[str]:
    return [line.split()[1] for line in log_text.splitlines() if line.rstrip().endswith("completed")]


def test_resume_after_driver_sigkill_keeps_finished_trials(tmp_path):
    experiment = tiny_experiment(tmp_path, name="resumable", num_samples=4, max_concurrent=1, epochs=3,
                                 scheduler={"type": "none"})
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tune", "sweep", str(experiment)], cwd=REPO,
                                  env=sweep_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(_finished_trials(log.read_text())) < 2:
            assert driver.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        finished = _finished_trials(log.read_text())
        assert len(finished) >= 2, "the sweep made no progress before the deadline"
    finally:
        # The driver and the local Ray it started (same session) die at once, as on a machine crash.
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    run_dir = tmp_path / "runs" / "resumable"
    assert not (run_dir / "trials.csv").exists(), "the sweep finished before it could be killed"
    before = {t: (run_dir / t / "result.json").read_text() for t in finished}

    proc = run_cli(tmp_path, "sweep", str(experiment), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["trial_status"] == "completed").all()
    for trial_id, text in before.items():
        assert (run_dir / trial_id / "result.json").read_text() == text, f"finished trial {trial_id} was re-run"
        epoch_lines = re.findall(rf"^\s*[\d.]+m\s+{trial_id}\s.*\d/3\s+[\d.]+\s*$", proc.stdout, re.M)
        assert not epoch_lines, f"finished trial {trial_id} trained again after resume: {epoch_lines}"
    for trial_id in trials["trial_id"]:
        epochs = [json.loads(line)["epoch"] for line in (run_dir / trial_id / "result.json").read_text().splitlines()]
        assert sorted(set(epochs)) == [1, 2, 3], (trial_id, epochs)
    study = load_study(run_dir, "resumable")
    told = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert sorted(t.user_attrs["ray_trial_id"] for t in told) == sorted(trials["trial_id"]), \
        "every trial must be in the study exactly once"
    # A trial the driver had started but Ray had not yet recorded when it died is replaced; its
    # Optuna trial is closed as FAIL and labelled, never left RUNNING or counted as a result.
    for lost in (t for t in study.trials if t not in told):
        assert lost.state == TrialState.FAIL and ORPHANED in lost.user_attrs
        assert lost.user_attrs.get("ray_trial_id") not in set(trials["trial_id"])


def test_resume_refuses_another_experiments_folder(tmp_path, cli_in_process):
    from tune.__main__ import main

    first = tiny_experiment(tmp_path, name="shared", num_samples=1, epochs=1)
    assert run_cli(tmp_path, "sweep", str(first)).returncode == 0
    other = tiny_experiment(tmp_path, name="shared", num_samples=1, epochs=2)
    # The refusals run in this process, which skips an interpreter's start-up; none of them may start Ray.
    proc = cli_in_process(main, "sweep", str(other), "--resume")
    assert proc.returncode == 2 and "belongs to a different experiment" in proc.stderr and "epochs" in proc.stderr
    assert proc.stderr.count("\n") == 1
    # Ray restores the concurrency limit with the searcher; a new one would be silently ignored.
    first = tiny_experiment(tmp_path, name="shared", num_samples=1, epochs=1)
    narrower = cli_in_process(main, "sweep", str(first), "--resume", "--max-concurrent", "1")
    assert narrower.returncode == 2 and "differs in max_concurrent)" in narrower.stderr, narrower.stderr
    # Ray restores each trial's threads and device too.
    wider = cli_in_process(main, "sweep", str(first), "--resume", "--cpus-per-trial", "2")
    assert wider.returncode == 2 and "differs in resources)" in wider.stderr, wider.stderr
    again = cli_in_process(main, "sweep", str(first))
    assert again.returncode == 2 and "already holds a sweep" in again.stderr
    nothing = cli_in_process(main, "sweep", str(tiny_experiment(tmp_path, name="fresh")), "--resume")
    assert nothing.returncode == 2 and "holds no sweep" in nothing.stderr
    assert not ray.is_initialized()


def test_orphaned_running_study_trials_are_closed_and_labelled(tmp_path):
    import optuna

    from tune.config import from_dict
    from tune.sweep import study_storage
    from tune.sweep import _close_open_study_trials

    experiment = from_dict({"name": "orphans", "space": {"arch": "late"}})
    study = optuna.create_study(study_name="orphans", storage=study_storage(tmp_path), direction="maximize")
    finished = study.ask()
    study.tell(finished, 0.5)
    study.ask()  # asked, then the driver died
    _close_open_study_trials(tmp_path, experiment)
    done, lost = optuna.load_study(study_name="orphans", storage=study_storage(tmp_path)).trials
    assert done.state == TrialState.COMPLETE and ORPHANED not in done.user_attrs
    assert lost.state == TrialState.FAIL and ORPHANED in lost.user_attrs


def _epochs_reported(run_dir) -> dict[str, int]:
    seen = {}
    for result in run_dir.glob("*/result.json"):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        try:
            seen[result.parent.name] = json.loads(lines[-1])["epoch"] if lines else 0
        except json.JSONDecodeError:  # a line being written
            pass
    return seen


def test_ctrl_c_after_the_last_trial_started_leaves_them_to_resume(tmp_path):
    """Ray ends every live trial TERMINATED on Ctrl+C, like a finished one. With all trials started,
    the sweep must still see them as cut off: unfinished, RUNNING in the study, continued by --resume."""
    experiment = tiny_experiment(tmp_path, name="interrupted", num_samples=2, max_concurrent=2, epochs=60,
                                 scheduler={"type": "none"}, space={"arch": "late", "width": 4, "hidden": 16,
                                                                    "lr": {"loguniform": [1e-3, 1e-2]}})
    run_dir = tmp_path / "runs" / "interrupted"
    with open(tmp_path / "first.log", "w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "tune", "sweep", str(experiment)], cwd=REPO,
                                  env=sweep_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            seen = _epochs_reported(run_dir)
            if len(seen) == 2 and min(seen.values()) >= 2:
                break
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.2)
        os.kill(driver.pid, signal.SIGINT)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    assert driver.returncode == 130 and "continue it with --resume" in log, (driver.returncode, log[-3000:])
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 2 and (trials["trial_status"] == "unfinished").all(), trials[["trial_id", "epoch"]]
    assert (trials["epoch"] < 60).all(), "a trial finished before the interrupt; the test proves nothing"
    study = load_study(run_dir, "interrupted")
    assert [t.state for t in study.trials] == [TrialState.RUNNING] * 2

    proc = run_cli(tmp_path, "sweep", str(experiment), "--resume", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume" not in proc.stderr
    # The progress table comes back pickled from the first launch, which was not quiet.
    assert "interrupted" not in proc.stdout and "epoch" not in proc.stdout, proc.stdout[-2000:]
    trials = read_trials_csv(run_dir / "trials.csv")
    assert (trials["trial_status"] == "completed").all() and (trials["epoch"] == 60).all()
    study = load_study(run_dir, "interrupted")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
