import io
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from dualnet import TrainConfig, evaluate_split, fit, load_model, save_model
from dualnet.data import DualData, Split
from dualnet.train import native_bf16, pick_precision

FAST = dict(width=8, hidden=256, epochs=6, lr=5e-3, batch_size=32, threads=2)


def _strip_timing(history):
    return [{k: v for k, v in m.items() if k not in ("epoch_s", "images_per_s")} for m in history]


@pytest.mark.parametrize("arch", ["late", "pixel"])
def test_both_designs_learn_the_synthetic_task(synthetic_data, arch):
    result = fit({**FAST, "arch": arch}, synthetic_data)
    assert result.status == "completed" and len(result.history) == FAST["epochs"]
    final = result.history[-1]
    assert final["val_joint_acc"] >= 0.95, final
    assert result.history[0]["train_loss"] > final["train_loss"]
    test = evaluate_split(result.model, synthetic_data.test)
    assert test["joint_acc"] >= 0.95


@pytest.mark.filterwarnings("ignore:precision. bf16 on a cpu without native bf16")
def test_test_score_is_what_the_saved_model_predicts(synthetic_data, tmp_path):
    """A bf16-trained model's test score counts exactly the predictions a user gets from the saved file."""
    result = fit({**FAST, "epochs": 1, "precision": "bf16"}, synthetic_data)
    path = tmp_path / "model.pt"
    save_model(result.model, path)
    test = synthetic_data.test
    class_pred, sum_pred = load_model(path).predict(test.images, test.numbers)
    both_right = (class_pred == test.labels) & (sum_pred == test.labels + test.numbers)
    assert evaluate_split(result.model, test)["joint_correct"] == int(both_right.sum())


def test_epoch_metrics_are_reported(synthetic_data):
    seen = []
    fit({**FAST, "epochs": 2}, synthetic_data, on_epoch=seen.append)
    assert [r.epoch for r in seen] == [1, 2]
    for key in ("train_loss", "val_loss", "val_class_acc", "val_sum_acc", "val_joint_acc", "epoch_s", "images_per_s"):
        assert key in seen[0].metrics
    m = seen[-1].metrics
    assert m["val_joint_acc"] <= min(m["val_class_acc"], m["val_sum_acc"])
    assert m["val_joint_correct"] == round(m["val_joint_acc"] * m["val_n"])


@pytest.mark.filterwarnings("ignore:precision. bf16 on a cpu without native bf16")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_same_config_and_seed_give_identical_metrics(synthetic_data, precision):
    # One bf16 epoch: on a CPU without native bf16 its convolutions take PyTorch's reference path, 8x slower.
    config = {**FAST, "epochs": 1 if precision == "bf16" else 2, "arch": "pixel", "dropout": 0.2,
              "precision": precision}
    first = fit(config, synthetic_data)
    second = fit(config, synthetic_data)
    assert _strip_timing(first.history) == _strip_timing(second.history)
    other = fit({**config, "seed": 1}, synthetic_data)
    assert _strip_timing(other.history) != _strip_timing(first.history)


def test_auto_precision_trains_in_what_the_device_runs_fast(synthetic_data, recwarn):
    """``auto`` (the default) trains exactly as the precision it resolves to, and says which in every epoch.

    On a CPU without native bf16 it must be fp32: there bf16 convolutions take PyTorch's slow reference path.
    """
    cpu = torch.device("cpu")
    resolved = pick_precision("auto", cpu)
    assert resolved == ("bf16" if native_bf16(cpu) else "fp32")
    assert TrainConfig().precision == "auto" and pick_precision("fp32", cpu) == "fp32"
    config = {**FAST, "epochs": 1, "device": "cpu"}
    auto = fit(config, synthetic_data)
    assert [m["precision"] for m in auto.history] == [resolved]
    assert _strip_timing(auto.history) == _strip_timing(fit({**config, "precision": resolved}, synthetic_data).history)
    other = fit({**config, "precision": "fp32" if resolved == "bf16" else "bf16"}, synthetic_data)
    assert _strip_timing(other.history) != _strip_timing(auto.history)  # the precision shows in the numbers
    slow_warnings = [w for w in recwarn.list if "without native bf16" in str(w.message)]
    assert len(slow_warnings) == (0 if native_bf16(cpu) else 1)  # only the explicit bf16 run on a CPU lacking it


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "onecycle"), ("sgd", "cosine"), ("adamw", "constant")])
def test_resume_from_checkpoint_equals_unbroken_run(synthetic_data, optimizer, schedule):
    config = {**FAST, "epochs": 3, "dropout": 0.3, "optimizer": optimizer, "schedule": schedule,
              "lr": 0.05 if optimizer == "sgd" else 5e-3}
    unbroken = fit(config, synthetic_data)
    saved = {}

    def keep_epoch_one(report):
        if report.epoch == 1:
            buffer = io.BytesIO()
            torch.save(report.state(), buffer)  # through bytes, as a real checkpoint would go
            saved["state"] = buffer.getvalue()

    fit({**config, "epochs": 3}, synthetic_data, on_epoch=keep_epoch_one)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    resumed = fit(config, synthetic_data, resume=state)
    assert _strip_timing(resumed.history) == _strip_timing(unbroken.history)
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), unbroken.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_kept_in_memory_still_resumes_like_the_unbroken_run(synthetic_data):
    """``state()`` must copy what the optimizer goes on updating in place (fused AdamW's moments and step)."""
    config = {**FAST, "epochs": 2}
    kept = []
    unbroken = fit(config, synthetic_data, on_epoch=lambda r: kept.append(r.state()) if r.epoch == 1 else None)
    assert kept[0]["optimizer"]["state"][0]["step"] == kept[0]["history"][0]["epoch"] * \
        -(-len(synthetic_data.train) // FAST["batch_size"])
    resumed = fit(config, synthetic_data, resume=kept[0])
    assert _strip_timing(resumed.history) == _strip_timing(unbroken.history)


def test_sgd_keeps_its_momentum_under_onecycle_while_adamw_beta1_cycles(synthetic_data):
    states = {}
    for optimizer in ("sgd", "adamw"):
        fit({**FAST, "epochs": 1, "optimizer": optimizer, "momentum": 0.5, "schedule": "onecycle"}, synthetic_data,
            on_epoch=lambda r, o=optimizer: states.__setitem__(o, r.state()))
    assert states["sgd"]["optimizer"]["param_groups"][0]["momentum"] == 0.5
    # The 1cycle policy moves AdamW's beta1 between 0.85 and 0.95 (not AdamW's own 0.9); at the end of
    # the cycle it is nearly back at 0.95.
    assert 0.94 < states["adamw"]["optimizer"]["param_groups"][0]["betas"][0] <= 0.95


def test_resume_refuses_a_checkpoint_from_another_config(synthetic_data):
    states = []
    fit({**FAST, "epochs": 1}, synthetic_data, on_epoch=lambda r: states.append(r.state()))
    with pytest.raises(ValueError, match="different config"):
        fit({**FAST, "epochs": 1, "lr": 1e-3}, synthetic_data, resume=states[0])


def test_divergence_stops_with_status_and_zero_metric(synthetic_data):
    seen = []
    result = fit({**FAST, "optimizer": "sgd", "lr": 1e6, "schedule": "constant"}, synthetic_data,
                 on_epoch=seen.append)
    assert result.status == "diverged"
    assert len(result.history) == 1 < FAST["epochs"]
    assert seen[-1].metrics["val_joint_acc"] == 0.0 and seen[-1].metrics["status"] == "diverged"
    # Not NaN, which Optuna refuses: a search on val_loss would lose the trial.
    assert seen[-1].metrics["val_loss"] == float("inf")
    # Without a validation split there is nothing to score, diverged or not.
    val = synthetic_data.val
    no_val = DualData(synthetic_data.train, Split(val.images[:0], val.labels[:0], val.numbers[:0]),
                      synthetic_data.test, synthetic_data.seed)
    result = fit({**FAST, "epochs": 1, "optimizer": "sgd", "lr": 1e6, "schedule": "constant"}, no_val)
    assert result.status == "diverged" and not any(k.startswith("val_") for k in result.history[-1])


@pytest.mark.parametrize("bad,key", [({"lr": -1}, "lr"), ({"optimizer": "adam"}, "optimizer"),
                                     ({"epochs": "ten"}, "epochs"), ({"learning_rate": 0.1}, "learning_rate"),
                                     ({"arch": "early"}, "arch"), ({"dropout": 1.5}, "dropout"),
                                     ({"channels_last": "yes"}, "channels_last"), ({"seed": -1}, "seed"),
                                     ({"seed": 2 ** 31}, "seed"), ({True: 1, "foo": 2}, "True"),
                                     ({"lr": "0.1"}, "lr"), ({"dropout": None}, "dropout"),
                                     ({"epochs": True}, "epochs"), ({"seed": 1.5}, "seed"),
                                     ({"weight_decay": float("nan")}, "weight_decay"),
                                     ({"threads": 100_000}, "threads")])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        TrainConfig.from_dict(bad)


def test_a_config_built_directly_is_type_checked_and_numbers_convert_without_loss():
    with pytest.raises(ValueError, match="channels_last: expected bool, got 'no'"):
        TrainConfig(channels_last="no").validate()  # a truthy string would have trained channels_last
    config = TrainConfig.from_dict({"batch_size": 64.0, "epochs": np.int64(3), "lr": np.float64(0.01), "hidden": 7})
    assert (config.batch_size, config.epochs, config.lr) == (64, 3, 0.01)
    assert type(config.batch_size) is int and type(config.epochs) is int and type(config.lr) is float
    with pytest.raises(ValueError, match="batch_size: expected int, got 64.5"):
        TrainConfig.from_dict({"batch_size": 64.5})


# Page faults per training step in a fresh process: fp32, width 16, batch 128, 2 threads, the fewest
# over epochs 3-6. Faulting buffers in again every step shows in every epoch; the heap growing by a
# few MiB once (784-3,137 faults, seen in up to two of those epochs) does not, and with a 19-step
# epoch it made the median fail about 1 run in 6. Run apart
# because the settings are process-wide and stay once made, and because other threads of the test
# process (Ray's, left by an earlier test) fault in memory of their own.
FAULTS_PER_STEP = """
import resource, sys
import torch
import dualnet.train
from dualnet import fit
from dualnet.data import make_data
if sys.argv[1] == "glibc-defaults":
    dualnet.train.keep_freed_memory = lambda: True
g = torch.Generator().manual_seed(0)
images, labels = torch.randint(0, 256, (2400, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (2400,))
data = make_data(images, labels, images[:100], labels[:100], val_size=0)
faults = []
fit(dict(width=16, batch_size=128, epochs=6, threads=2, precision="fp32", channels_last=False), data,
    on_epoch=lambda _: faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
per_epoch = [after - before for before, after in zip(faults[1:], faults[2:])]
print(min(per_epoch) / -(-len(data.train) // 128))
"""


# Asks for glibc without calling keep_freed_memory, which would change this process's allocator.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in():
    def faults_per_step(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])

    # Under glibc's defaults each step's buffers are unmapped and faulted in again (hundreds of
    # faults per step here); fit's settings make steps reuse the heap instead.
    assert faults_per_step("glibc-defaults") > 100
    assert faults_per_step("fit") < 20
