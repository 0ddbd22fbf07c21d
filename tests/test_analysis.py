"""Analysis of the session's tiny sweep: DataFrames, statuses, importances, plots, report, export, confirmation."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from dualnet import load_data, load_model
from dualnet.train import TrainConfig, fit, load_config_file
from tune import analysis

from .conftest import REPO
from .sweeps import read_trials_csv, run_cli, sweep_env

pytestmark = pytest.mark.slow


def test_trials_and_history_frames(sweep):
    run_dir, _ = sweep
    loaded = analysis.load(run_dir)
    trials, history = loaded.trials, loaded.history
    assert len(trials) == 8 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "stopped_early"}
    for column in ("arch", "lr", "width", "hidden", "batch_size", "epochs_run", "last_val_joint_acc",
                   "best_val_joint_acc", "last_val_loss", "wall_s"):
        assert column in trials, column
    assert trials["lr"].dtype == float and pd.api.types.is_integer_dtype(trials["width"])
    assert (trials["best_val_joint_acc"] >= trials["last_val_joint_acc"]).all()
    # Status agrees with the sweep's own classification, and ASHA stops are stopped_early.
    ray_view = read_trials_csv(run_dir / "trials.csv").set_index("trial_id")["trial_status"]
    assert (trials.set_index("trial_id")["status"] == ray_view.loc[trials["trial_id"]].values).all()
    assert (trials["status"] == "stopped_early").any()
    assert len(history) == trials["epochs_run"].sum()
    assert not history.duplicated(["trial_id", "epoch"]).any()
    assert {"train_loss", "val_joint_acc", "epoch_s", "images_per_s"} <= set(history.columns)


def test_several_runs_carry_their_name(sweep, tmp_path):
    import optuna

    from tune.sweep import EXPERIMENT_FILE, STUDY_FILE, quiet_optuna, study_storage

    # A second run: the session's sweep copied under another name, its study copied to that name.
    run_dir, _ = sweep
    other = tmp_path / "other"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns(STUDY_FILE))
    experiment = yaml.safe_load((run_dir / EXPERIMENT_FILE).read_text())
    (other / EXPERIMENT_FILE).write_text(yaml.safe_dump({**experiment, "name": "other"}))
    with quiet_optuna():
        optuna.copy_study(from_study_name=experiment["name"], from_storage=study_storage(run_dir),
                          to_storage=study_storage(other), to_study_name="other")
    both = analysis.load([run_dir, other])
    assert list(both.trials.columns[:1]) == ["run"] and len(both.trials) == 16
    statuses = {name: sorted(group["status"]) for name, group in both.trials.groupby("run")}
    assert statuses["other"] == statuses[experiment["name"]]  # the copy reads its own study, as the original


def test_best_overall_and_per_design(sweep):
    loaded = analysis.load(sweep[0])
    best = loaded.best()
    completed = loaded.trials[loaded.trials["status"] == "completed"]
    assert best.iloc[0]["last_val_joint_acc"] == completed["last_val_joint_acc"].max()
    per_arch = loaded.best(by="arch")
    assert set(per_arch["arch"]) == set(loaded.trials["arch"])  # with or without a full-budget trial
    assert per_arch["arch"].is_unique
    # Nonsense is refused, not answered with an empty frame or pandas' head(-1).
    for kwargs, message in (({"metric": "train_loss"}, "not a validation metric"), ({"top": -1}, "top=-1"),
                            ({"by": "bogus"}, "--by bogus: no such column")):
        with pytest.raises(analysis.AnalysisError, match=message):
            loaded.best(**kwargs)
    with pytest.raises(analysis.AnalysisError, match="--by bogus: no such column"):
        loaded.importances(by="bogus")
    for run_dirs, message in (([], "no run folder given"), ([sweep[0], sweep[0]], "is already loaded")):
        with pytest.raises(analysis.AnalysisError, match=message):
            analysis.load(run_dirs)


def test_a_design_asha_always_stopped_early_keeps_its_best_config(sweep):
    """Per design, full-budget trials win, but a design with none falls back to its early-stopped trials
    instead of vanishing from best.yaml."""
    loaded = analysis.load(sweep[0])
    trials = loaded.trials.copy()
    pixel = trials["arch"] == "pixel"
    trials.loc[pixel, "status"] = "stopped_early"
    trials.loc[~pixel & (trials["status"] == "stopped_early"), "last_val_joint_acc"] = 1.0  # must not win
    per_arch = analysis.Sweep(loaded.experiments, trials, loaded.history).best(by="arch").set_index("arch")
    assert set(per_arch.index) == {"late", "pixel"}
    assert per_arch.loc["pixel", "last_val_joint_acc"] == trials.loc[pixel, "last_val_joint_acc"].max()
    assert per_arch.loc["late", "status"] == "completed"


def test_importances_sum_to_one(sweep):
    importances = analysis.load(sweep[0]).importances()
    assert not importances.empty, "fANOVA needs >= 3 full-budget trials; the fixture sweep should have them"
    assert importances.groupby("group")["importance"].sum().round(6).eq(1.0).all()
    assert set(importances["param"]) <= {"arch", "lr", "width"}


def test_analyze_cli_writes_tables_plots_and_report(sweep, tmp_path):
    out = tmp_path / "analysis"
    proc = run_cli(tmp_path, "analyze", str(sweep[0]), "--by", "arch", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Leaderboard" in proc.stdout and "Best config per arch" in proc.stdout
    for name in ("trials.csv", "trials.parquet", "history.csv", "history.parquet", "importances.csv"):
        assert (out / name).stat().st_size > 0, name
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == {"learning_curves", "metric_vs_lr", "metric_vs_width", "parallel_coordinates",
                                      "importances", "design_comparison"}
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 100 and height > 100
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "<table" in page and "Leaderboard" in page
    typo = run_cli(tmp_path, "analyze", str(sweep[0]), "--by", "archh", "--out", str(tmp_path / "typo"))
    assert typo.returncode == 2 and "--by archh: no such column" in typo.stderr and typo.stderr.count("\n") == 1
    assert not (tmp_path / "typo").exists()


def test_export_round_trips_to_the_same_validation_metric(sweep, tmp_path):
    run_dir, _ = sweep
    proc = run_cli(tmp_path, "best", str(run_dir), "-o", str(tmp_path / "best.yaml"))
    assert proc.returncode == 0, proc.stderr
    (config,) = load_config_file(tmp_path / "best.yaml")
    experiment = yaml.safe_load((run_dir / "experiment.yaml").read_text())
    data = load_data(experiment["data"]["dir"], download=False, val_size=experiment["data"]["val_size"],
                     seed=experiment["data"]["seed"])
    retrained = fit(TrainConfig.from_dict({**config, "threads": 1}), data)
    best = analysis.load(run_dir).best().iloc[0]
    assert retrained.history[-1]["val_joint_acc"] == best["last_val_joint_acc"]

    per_arch = run_cli(tmp_path, "best", str(run_dir), "--by", "arch", "-o", str(tmp_path / "both.yaml"))
    assert per_arch.returncode == 0
    assert {c["arch"] for c in load_config_file(tmp_path / "both.yaml")} <= {"late", "pixel"}
    # One config per trial would put several configs of one design in a file, which training reads by design.
    per_trial = run_cli(tmp_path, "best", str(run_dir), "--by", "trial_id", "-o", str(tmp_path / "each.yaml"))
    assert per_trial.returncode == 2 and "several configs for the" in per_trial.stderr
    assert len(per_trial.stderr.strip().splitlines()) == 1 and not (tmp_path / "each.yaml").exists()


def test_confirm_trains_seeds_and_reports_intervals(sweep, tmp_path):
    run_dir, _ = sweep
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"configs": [{"arch": "late", "width": 4, "hidden": 32, "epochs": 1},
                                                {"arch": "pixel", "width": 4, "hidden": 32, "epochs": 1}]}))
    data_dir = yaml.safe_load((run_dir / "experiment.yaml").read_text())["data"]["dir"]
    proc = run_cli(tmp_path, "confirm", str(both), "--seeds", "2", "--out", str(tmp_path / "confirm"),
                "--data-dir", data_dir, "--no-download")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "confirm" / "confirm.json").read_text())
    assert len(report["runs"]) == 4 and {r["seed"] for r in report["runs"]} == {0, 1}
    for arch in ("late", "pixel"):
        stats = report["designs"][arch]["joint_acc"]
        assert stats["n"] == 2 and stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
        runs = [r for r in report["runs"] if r["arch"] == arch]
        assert stats["mean"] == pytest.approx(sum(r["test_joint_acc"] for r in runs) / 2)
        model = load_model(runs[0]["model_path"])
        assert model.arch == arch
    assert report["difference"]["of"] == "late - pixel"
    assert "late - pixel" in proc.stdout and "95% interval" in proc.stdout
    # A rerun into the same folder with one design and one seed leaves only its own model there.
    late = tmp_path / "late.yaml"
    late.write_text(yaml.safe_dump({"arch": "late", "width": 4, "hidden": 32, "epochs": 1}))
    rerun = run_cli(tmp_path, "confirm", str(late), "--seeds", "1", "--out", str(tmp_path / "confirm"),
                 "--data-dir", data_dir, "--no-download", "--no-ray")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "removed 3 model(s) an earlier confirmation left in" in rerun.stdout
    report = json.loads((tmp_path / "confirm" / "confirm.json").read_text())
    assert [Path(r["model_path"]).name for r in report["runs"]] == ["late-seed0.pt"]
    # One seed has no spread: null, not NaN (which is not JSON).
    assert report["designs"]["late"]["joint_acc"]["std"] is None
    assert "NaN" not in (tmp_path / "confirm" / "confirm.json").read_text()
    assert sorted(p.name for p in (tmp_path / "confirm" / "models").iterdir()) == ["late-seed0.pt"]
    # A task bigger than the cluster would wait forever in Ray's queue.
    greedy = run_cli(tmp_path, "confirm", str(both), "--seeds", "1", "--out", str(tmp_path / "greedy"),
                  "--data-dir", data_dir, "--no-download", "--cpus-per-task", "64")
    assert greedy.returncode == 2 and "--cpus-per-task: each run asks for 64 CPUs but the Ray cluster has" in greedy.stderr
    assert greedy.stderr.count("\n") == 1 and not (tmp_path / "greedy" / "confirm.json").exists()


def test_clear_errors_for_non_runs_and_empty_runs(tmp_path, cli_in_process):
    from tune.__main__ import main

    proc = run_cli(tmp_path, "analyze", str(tmp_path))  # the rest in this process, which skips its start-up
    assert proc.returncode == 2 and "is not a sweep run folder" in proc.stderr and proc.stderr.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "experiment.yaml").write_text(yaml.safe_dump({"name": "empty", "space": {"arch": "late"}}))
    proc = cli_in_process(main, "analyze", str(empty))
    assert proc.returncode == 2 and "has no trials yet" in proc.stderr and proc.stderr.count("\n") == 1
    proc = cli_in_process(main, "best", str(empty), "-o", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and not (tmp_path / "x.yaml").exists()
    (empty / "experiment.yaml").write_text(yaml.safe_dump({"name": "empty", "space": {"arch": "late"},
                                                           "storage": "s3://bucket/sweeps"}))
    proc = cli_in_process(main, "analyze", str(empty), "--top", "3")
    assert proc.returncode == 2 and "trial folders are in s3://bucket/sweeps/empty; copy that folder here" \
        in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = cli_in_process(main, "analyze", str(empty), "--top", "-3")
    assert proc.returncode == 2 and "--top -3: must be >= 1" in proc.stderr
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"arch": "late"}))
    for flag in ("--seeds", "--epochs", "--cpus-per-task"):
        proc = cli_in_process(main, "confirm", str(config), flag, "0", "--out", str(tmp_path / "confirm"))
        assert proc.returncode == 2 and f"{flag} 0: must be >= 1" in proc.stderr and proc.stderr.count("\n") == 1
    # Settings only this machine or Ray rules out fail before any data is read (there is none here).
    config.write_text(yaml.safe_dump({"arch": "late", "device": "cuda:99"}))
    missing = ["--data-dir", str(tmp_path / "no-data"), "--no-download", "--out", str(tmp_path / "confirm")]
    for args, message in ((["--no-ray"], "device: 'cuda:99', but this machine has"),
                          ([], "each run reserves no GPU; pass --gpus-per-task"),
                          (["--gpus-per-task", "-1"], "--gpus-per-task -1: must be 0, a fraction"),
                          (["--no-ray", "--gpus-per-task", "0.5"], "--gpus-per-task 0.5: reserves GPUs for Ray tasks")):
        proc = cli_in_process(main, "confirm", str(config), *missing, *args)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "confirm").exists()
    assert not ray.is_initialized(), "a refused confirm started Ray"


def test_confirm_summary_names_diverged_seeds_it_counted_as_zero():
    from tune.confirm import format_summary, summarize

    runs = [{"arch": "late", "seed": seed, "status": status, "test_joint_acc": acc, "test_class_acc": acc,
             "test_sum_acc": acc} for seed, status, acc in ((0, "completed", 0.9), (1, "diverged", 0.0),
                                                            (2, "completed", 0.9))]
    summary = summarize(runs)
    assert summary["designs"]["late"]["joint_acc"]["mean"] == pytest.approx(0.6)
    assert summary["diverged"] == {"late": [1]}
    text = format_summary({"seeds": 3, **summary})
    assert "note: late diverged with seed(s) 1; each counts as 0 accuracy above" in text


def test_ctrl_c_during_confirm_does_not_point_to_a_resume_it_lacks(tmp_path):
    import signal
    import time

    from .conftest import write_dataset

    write_dataset(tmp_path / "idx", n_train=1000, n_test=200)
    config = tmp_path / "late.yaml"
    config.write_text(yaml.safe_dump({"arch": "late", "width": 4, "hidden": 16, "epochs": 500}))
    confirm = subprocess.Popen([sys.executable, "-m", "tune", "confirm", str(config), "--seeds", "1", "--no-ray",
                                "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "idx"),
                                "--no-download"], cwd=REPO, env=sweep_env(tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert confirm.stdout.readline().startswith("confirm: 1 runs"), "confirm did not start training"
    time.sleep(1)
    confirm.send_signal(signal.SIGINT)
    _, stderr = confirm.communicate(timeout=60)
    assert confirm.returncode == 130 and stderr.strip() == "interrupted", stderr[-2000:]
    assert not (tmp_path / "out" / "confirm.json").exists()


def test_a_damaged_saved_experiment_is_named_not_a_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for content, message in ((b"\xff\xfe binary", "not a YAML text file"), (b"name: [", "not valid YAML"),
                             (b"name: x\n", "space")):
        (run / "experiment.yaml").write_bytes(content)
        with pytest.raises(analysis.AnalysisError, match=f"unreadable run: {run / 'experiment.yaml'}: .*{message}"):
            analysis.load(run)
