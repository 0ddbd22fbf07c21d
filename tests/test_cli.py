"""``python -m dualnet train`` end to end on synthetic IDX files."""

import subprocess
import sys

import torch
import yaml

from dualnet import load_model
from dualnet.train import TrainConfig

from .conftest import REPO, write_dataset


def _train(tmp_path, *args):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DUALNET_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "dualnet", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_both_designs_prints_epochs_saves_models_and_test_accuracy(tmp_path):
    write_dataset(tmp_path / "idx", n_train=1200, n_test=300)
    proc = _train(tmp_path, "--arch", "both", "--epochs", "2", "--width", "4", "--hidden", "32",
                  "--data-dir", str(tmp_path / "idx"), "--no-download", "--val-size", "200", "--threads", "1",
                  "--eval-test", "--save", str(tmp_path / "out" / "model.pt"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for arch in ("late", "pixel"):
        epoch_lines = [line for line in lines if line.startswith(f"[{arch}] epoch")]
        assert len(epoch_lines) == 2
        assert "images 1000" in epoch_lines[0] and "val class" in epoch_lines[0] and "img/s" in epoch_lines[0]
        assert any(line.startswith(f"[{arch}] test:") and "joint" in line for line in lines)
        model = load_model(tmp_path / "out" / f"model-{arch}.pt")
        class_pred, sum_pred = model.predict(torch.zeros(3, 28, 28, dtype=torch.uint8), torch.tensor([0, 5, 9]))
        assert class_pred.shape == (3,) and sum_pred.shape == (3,)
    assert "the number overwrites garment ink" in proc.stdout


def test_train_accepts_a_config_file_and_flags_override_it(tmp_path):
    write_dataset(tmp_path / "idx", n_train=600, n_test=100)
    config = tmp_path / "best.yaml"
    # Written by hand, as a user would: YAML 1.1 alone would read 2e-3 as a string.
    config.write_text(yaml.safe_dump({"arch": "pixel", "width": 4, "hidden": 16, "epochs": 3,
                                      "meta": {"from": "a sweep"}}) + "lr: 2e-3\n")
    proc = _train(tmp_path, "--config", str(config), "--epochs", "1", "--data-dir", str(tmp_path / "idx"),
                  "--val-size", "100", "--save", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("[pixel] epoch  1/1") for line in proc.stdout.splitlines()) == 1
    assert load_model(tmp_path / "m.pt").hparams["width"] == 4 and proc.stderr == ""
    # A design the file has no config for borrows another design's settings, and says so.
    proc = _train(tmp_path, "--config", str(config), "--arch", "late", "--epochs", "1",
                  "--data-dir", str(tmp_path / "idx"), "--val-size", "100")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"warning: {config} holds no late config; late trains with the settings of its pixel config\n"
    assert sum(line.startswith("[late] epoch  1/1") for line in proc.stdout.splitlines()) == 1


def test_bad_flags_and_config_give_one_line_exit_2(tmp_path, cli_in_process):
    from dualnet.__main__ import main

    write_dataset(tmp_path / "idx", n_train=600, n_test=100)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"arch": "late", "learning_rate": 0.1}))
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"configs": [{"arch": "late", "width": 4}, {"arch": "late", "width": 8}]}))
    binary = tmp_path / "binary.pt"
    binary.write_bytes(bytes(range(128, 256)))
    data = ["--data-dir", str(tmp_path / "idx"), "--val-size", "100"]
    cases = ((["--config", str(bad)], "learning_rate"), (["--lr", "-1"], "lr"),
             (["--train-subset", "999999"], "train_subset"),
             (["--config", str(twice)], "2 configs for the 'late' design"),
             (["--config", str(tmp_path / "absent.yaml")], "absent.yaml: cannot read config file"),
             (["--config", str(binary)], "binary.pt: not a YAML text file"),
             (["--seed", "3000000000000000"], "seed: must be an integer in"),
             (["--threads", "100000"], "threads: at most 1024"),
             (["--weight-decay", "nan"], "weight_decay: must be a finite number, got nan"),
             (["--lr", "inf"], "lr: must be a finite number, got inf"),
             (["--data-seed", "-1"], "data seed: must be an integer in"),
             (["--save", str(tmp_path)], "is a folder"),
             (["--device", "cudax"], "cuda[:N]"), (["--device", "cuda:7"], "CUDA device(s)"))
    for index, (args, message) in enumerate(cases):
        # The first as a user meets it; the rest in this process, which skips an interpreter's start-up.
        proc = _train(tmp_path, *args, *data) if index == 0 else cli_in_process(main, "train", *args, *data)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "epoch" not in proc.stdout, args  # refused before any training
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_a_config_entry_without_arch_is_the_late_design_only(tmp_path):
    write_dataset(tmp_path / "idx", n_train=600, n_test=100)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({"configs": [{"width": 4, "hidden": 16}, {"arch": "pixel", "width": 6,
                                                                               "hidden": 16}]}))
    proc = _train(tmp_path, "--config", str(config), "--epochs", "1", "--data-dir", str(tmp_path / "idx"),
                  "--val-size", "100", "--save", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert load_model(tmp_path / "m-late.pt").hparams["width"] == 4
    assert load_model(tmp_path / "m-pixel.pt").hparams["width"] == 6


def test_val_size_0_trains_on_every_image_and_scores_only_the_test_set(tmp_path):
    write_dataset(tmp_path / "idx", n_train=600, n_test=100)
    proc = _train(tmp_path, "--arch", "both", "--epochs", "1", "--width", "4", "--hidden", "16", "--val-size", "0",
                  "--eval-test", "--data-dir", str(tmp_path / "idx"))
    assert proc.returncode == 0, proc.stderr
    assert "[late] epoch  1/1 | images 600 | train loss" in proc.stdout and "val class" not in proc.stdout
    assert sum(line.startswith("[pixel] test:") for line in proc.stdout.splitlines()) == 1


def test_help_documents_every_training_setting():
    out = subprocess.run([sys.executable, "-m", "dualnet", "train", "--help"], cwd=REPO, capture_output=True,
                         text=True).stdout
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in out, field
    for flag in ("--eval-test", "--save", "--data-dir", "--no-download", "--val-size", "--train-subset"):
        assert flag in out
