"""The experiment-file validator: every shipped file loads; every bad file gets one line naming the key."""

import socket
import subprocess
import sys

import pytest
import yaml

from tune.config import ConfigError, from_dict, load_experiment

from .conftest import REPO

GOOD = {"name": "t", "epochs": 2, "space": {"arch": {"choice": ["late", "pixel"]}, "lr": {"loguniform": [1e-3, 1e-2]}}}


def _with(**changes):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = raw
        for key in parents:
            target = target.setdefault(key, {})
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return raw


DELETE = object()

BAD = [
    # (raw experiment, text the one-line error must contain)
    (_with(num_sampels=4), "num_sampels: unknown key"),
    (_with(name=DELETE), "name: required"),
    (_with(space=DELETE), "space: required"),
    (_with(name="../escape"), "name: '../escape'"),
    (_with(name="a/b"), "name: 'a/b'"),
    (_with(epochs="ten"), "epochs: expected an integer"),
    (_with(epochs=0), "epochs: must be >= 1"),
    (_with(num_samples=True), "num_samples: expected an integer"),
    (_with(metric="accuracy"), "metric: 'accuracy'"),
    (_with(mode="maximise"), "mode: 'maximise'"),
    (_with(metric="val_loss"), "mode: val_loss should be minimised"),
    (_with(space__arch="early"), "space.arch: arch: 'early'"),
    (_with(space__arch={"choice": ["late", "cnn"]}), "space.arch: arch: 'cnn'"),
    (_with(space__lr={"loguniform": [1e-2, 1e-3]}), "space.lr.loguniform: range [0.01, 0.001] is empty or inverted"),
    (_with(space__lr={"uniform": [0.1, 0.1]}), "space.lr.uniform: range [0.1, 0.1] is empty"),
    (_with(space__lr={"loguniform": [0, 1e-2]}), "space.lr.loguniform: bounds must be > 0"),
    (_with(space__lr={"normal": [0, 1]}), "space.lr: unknown distribution 'normal'"),
    (_with(space__lr={"choice": []}), "space.lr.choice: expected a non-empty list"),
    (_with(space__lr={"uniform": [1e-3]}), "space.lr.uniform: expected [low, high]"),
    (_with(space__width={"uniform": [8, 32]}), "space.width: uniform on an integer hyperparameter"),
    (_with(space__width={"int": ["8", 32]}), "space.width: expected an integer"),
    (_with(space__lr={"int": [1, 3]}), "space.lr: int distribution on a real-valued"),
    (_with(space__learning_rate=0.1), "space.learning_rate: unknown hyperparameter"),
    (_with(space__epochs=3), "space.epochs: unknown hyperparameter (every trial trains for the top-level epochs"),
    (_with(space__threads=4), "space.threads: unknown hyperparameter (the harness sets it from resources.cpu"),
    (_with(space__weight_decay=float("nan")), "space.weight_decay: must be a finite number, got nan"),
    (_with(space__lr={"loguniform": [1e-3, float("inf")]}), "space.lr: must be a finite number, got inf"),
    (_with(space__lr={"choice": [1e-3, float("inf")]}), "space.lr: must be a finite number, got inf"),
    (_with(resources__cpu=float("inf")), "resources.cpu: must be a finite number, got inf"),
    (_with(space__dropout={"uniform": [0.0, 1.5]}), "space.dropout: dropout"),
    (_with(space__optimizer={"choice": ["adamw", "adam"]}), "space.optimizer: optimizer: 'adam'"),
    (_with(space={"lr": 0.01}), "space.arch: required"),
    (_with(searcher__type="bayes"), "searcher.type: 'bayes'"),
    (_with(searcher__n_startup=3), "searcher.n_startup: unknown key"),
    (_with(scheduler__type="hyperband"), "scheduler.type: 'hyperband'"),
    (_with(scheduler__grace_period=5), "scheduler.grace_period: 5 exceeds epochs"),
    (_with(scheduler__reduction_factor=1), "scheduler.reduction_factor: must be >= 2"),
    (_with(resources__cpu=0), "resources.cpu: must be > 0"),
    (_with(resources__gpu=1.5), "resources.gpu: a fraction must be below 1"),
    (_with(resources__tpu=1), "resources.tpu: unknown key"),
    (_with(data__val_size=-5), "data.val_size: must be >= 1"),
    (_with(data="everything"), "data: expected a mapping"),
    (_with(time_budget_s=-1), "time_budget_s: must be > 0"),
    (_with(epoch_budget=0), "epoch_budget: must be >= 1"),
    (_with(seed=-1), "seed: must be an integer in [0, 2147483648), got -1"),
    (_with(data__seed=2 ** 40), "data.seed: must be an integer in [0, 2147483648)"),
    (_with(scheduler__metric="test_joint_acc"), "scheduler.metric: 'test_joint_acc' is not reported"),
    (_with(epoch_budget=2.5), "epoch_budget: expected an integer"),
    (_with(searcher__type="grid"), "a grid searcher takes only fixed values and choice lists"),
]


@pytest.mark.parametrize("raw,message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_experiments_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiments_are_valid(path):
    experiment = load_experiment(path)
    assert experiment.name == path.stem
    assert experiment.metric == "val_joint_acc"


def test_shipped_experiments_cover_both_designs_and_sizes():
    quick, default = load_experiment(REPO / "experiments/quick.yaml"), load_experiment(REPO / "experiments/default.yaml")
    for e in (quick, default):
        assert e.space["arch"].args == ["late", "pixel"]
    assert quick.data.train_subset and quick.epochs <= 3 and quick.num_samples <= 10
    assert default.data.train_subset is None and default.epochs == 10 and default.num_samples >= 48
    assert default.scheduler.type == "asha"
    assert 0 < load_experiment(REPO / "experiments/gpu.yaml").resources.gpu < 1


def test_flags_override_the_file():
    e = load_experiment(REPO / "experiments/quick.yaml", {"num_samples": 3, "resources.cpu": 2.0, "epochs": None})
    assert e.num_samples == 3 and e.resources.cpu == 2.0 and e.epochs == 3


@pytest.mark.parametrize("epochs, first_rung", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 3), (10, 3), (20, 6)])
def test_asha_first_rung_defaults_to_the_epoch_after_onecycle_warm_up(epochs, first_rung):
    from tune.search import make_scheduler

    experiment = from_dict(_with(epochs=epochs))
    assert experiment.scheduler.grace_period is None
    assert experiment.scheduler.first_rung(epochs) == first_rung
    assert make_scheduler(experiment)._brackets[0]._rungs[-1][0] == first_rung  # Ray's lowest milestone
    explicit = from_dict(_with(epochs=epochs, scheduler__grace_period=1))
    assert explicit.scheduler.first_rung(epochs) == 1


def test_round_trip_through_plain_data():
    e = load_experiment(REPO / "experiments/default.yaml")
    assert from_dict(e.to_dict()) == e


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tune", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_bad_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with(space__lr={"loguniform": [1e-2, 1e-3]}, storage=str(tmp_path / "runs"))))
    proc = _cli("sweep", str(bad))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "space.lr.loguniform" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing may be written for a rejected experiment"


@pytest.mark.parametrize("content,message", [("name: [unclosed", "not valid YAML"), ("- a\n- b\n", "expected a mapping")])
def test_cli_unparseable_files(tmp_path, content, message, cli_in_process):
    from tune.__main__ import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    proc = cli_in_process(main, "sweep", str(bad))
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1


def test_cli_missing_file_and_bad_flag(tmp_path, cli_in_process):
    from tune.__main__ import main

    proc = _cli("sweep", str(tmp_path / "absent.yaml"))  # the rest in this process, which skips its start-up
    assert proc.returncode == 2 and "cannot read experiment file" in proc.stderr
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# r\xe9sum\xe9\nname: x\n".encode("latin-1"))
    proc = cli_in_process(main, "sweep", str(latin1))
    assert proc.returncode == 2 and "latin1.yaml: not a YAML text file" in proc.stderr and proc.stderr.count("\n") == 1
    proc = cli_in_process(main, "sweep", str(REPO / "experiments/quick.yaml"), "--num-samples", "0")
    assert proc.returncode == 2 and "num_samples: must be >= 1" in proc.stderr
    proc = cli_in_process(main, "sweep", str(REPO / "experiments/quick.yaml"), "--name", "../../etc")
    assert proc.returncode == 2 and "name:" in proc.stderr


def test_cli_a_ray_address_where_nothing_answers_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, message in (("nonsense", "expected HOST:PORT of the head node"),
                             (f"127.0.0.1:{port}", "nothing answers there")):
        proc = _cli("sweep", str(REPO / "experiments/quick.yaml"), "--address", address,
                    "--storage", str(tmp_path / "runs"))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "quick").exists(), "a rejected sweep left its run folder"


def test_help_documents_every_flag():
    out = _cli("sweep", "--help").stdout
    for flag in ("--num-samples", "--max-concurrent", "--cpus-per-trial", "--gpus-per-trial", "--epochs",
                 "--storage", "--address", "--resume", "--name"):
        assert flag in out


def test_exponents_without_a_dot_read_as_numbers(tmp_path):
    # YAML 1.1 makes "1e-3" a string; users write it anyway.
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nepochs: 2\nspace:\n  arch: late\n  lr: {loguniform: [1e-4, 1e-1]}\n"
                    "  weight_decay: 5e-4\n")
    experiment = load_experiment(path)
    assert experiment.space["lr"].args == [1e-4, 1e-1]
    assert experiment.space["weight_decay"].args == [5e-4]
