"""The benchmarks' own arithmetic and measurements (not their timings, which only the scripts report)."""

import os
import subprocess
import sys
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import asha_replay  # noqa: E402
import concurrency  # noqa: E402
import sample_efficiency  # noqa: E402
import throughput  # noqa: E402
from dualnet.train import TrainConfig  # noqa: E402


def report(timestamp: float, value: float) -> dict:
    return {"timestamp": timestamp, "val_joint_acc": value}


def test_best_so_far_counts_epochs_in_the_order_they_happened():
    trials = [[report(1, 0.2), report(3, 0.5)], [report(2, 0.4), report(4, 0.3), report(5, 0.7)]]
    assert sample_efficiency.best_so_far(trials, "val_joint_acc") == [(1, 0.2), (2, 0.4), (3, 0.5), (4, 0.5),
                                                                      (5, 0.7)]


def test_epochs_to_target_respects_the_budget():
    curve = [(1, 0.2), (2, 0.4), (3, 0.5), (4, 0.5), (5, 0.7)]
    assert sample_efficiency.epochs_to(curve, 0.5, budget=5) == 3
    assert sample_efficiency.epochs_to(curve, 0.7, budget=4) is None
    assert sample_efficiency.epochs_to(curve, 0.9, budget=5) is None


def test_shared_memory_mapped_by_a_process_is_counted():
    block = shared_memory.SharedMemory(create=True, size=8 * 2 ** 20)
    try:
        np.ndarray((8 * 2 ** 20,), dtype=np.uint8, buffer=block.buf)[:] = 1  # touch every page
        assert concurrency.shm_rss_kib(str(os.getpid())) >= 8 * 1024
        assert concurrency.rollup(str(os.getpid()))["Rss"] >= 8 * 2 ** 20
    finally:
        block.close()
        block.unlink()


def test_descendants_finds_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        for _ in range(100):
            found = concurrency.descendants(os.getpid())
            if len(found) >= 2:
                break
            time.sleep(0.1)
        assert str(child.pid) in found
        assert len(found) >= 2  # the child and the grandchild it started
    finally:
        for pid in concurrency.descendants(child.pid):
            os.kill(int(pid), 9)
        child.kill()
        child.wait()


def test_random_search_expectation_is_geometric_in_trials():
    # 1 of 10 trials reaches the target: the first success is at trial ceil(ln .5 / ln .9) = 7 by median, 10 on average.
    finals = [0.9] + [0.5] * 9
    expected = sample_efficiency.random_expected_epochs(finals, 0.8, epochs=8)
    assert {k: expected[k] for k in ("successes", "p", "median_epochs", "mean_epochs")} == {
        "successes": 1, "p": 0.1, "median_epochs": 56, "mean_epochs": 80.0}
    # 1 success in 10 leaves p anywhere in [0.0025, 0.445] (Clopper-Pearson): 2 to 274 trials by median.
    assert expected["median_epochs_95"] == [2 * 8, 274 * 8]
    assert sample_efficiency.random_expected_epochs(finals, 0.95, epochs=8)["median_epochs"] is None
    assert sample_efficiency.random_expected_epochs([0.9, 0.9], 0.8, epochs=4)["median_epochs"] == 4


def trial(start: float, accuracies: list[float]) -> list[dict]:
    return [report(start + epoch, value) for epoch, value in enumerate(accuracies)]


def test_targets_come_from_random_trials_and_unreached_ones_count_past_the_budget():
    runs = {
        # One seed of random search: four trials of 2 epochs, run one after another.
        "random": [[trial(0, [0.1, 0.2]), trial(10, [0.3, 0.4]), trial(20, [0.5, 0.6]), trial(30, [0.7, 0.8])]],
        "tpe+asha": [[trial(0, [0.1]), trial(1, [0.5, 0.9])]],
    }
    finals = sample_efficiency.random_finals(runs)
    curves = {name: [sample_efficiency.best_so_far(trials, "val_joint_acc") for trials in per_seed]
              for name, per_seed in runs.items()}
    targets = sample_efficiency.compare(curves, finals, [0.5, 0.99], epochs=2, budget=4)
    assert finals == [0.2, 0.4, 0.6, 0.8]
    easy, hard = targets
    assert easy["val_joint_acc"] == 0.5  # the median of the random finals
    assert easy["searches"]["random"]["epochs_to_target"] == [None]  # at epoch 6, past the budget of 4
    assert easy["searches"]["random"]["median"] == 5  # so it counts as budget + 1
    assert easy["searches"]["tpe+asha"]["epochs_to_target"] == [2]
    assert easy["searches"]["tpe+asha"]["over_random_runs"] is None  # random never got there: no ratio
    # Half the random trials succeed, so random search needs 1 trial (2 epochs) by median.
    assert easy["searches"]["tpe+asha"]["over_random_expected"] == 2 / 2
    assert hard["random_expected"]["successes"] == 1  # a quantile never lies above the best random trial
    assert hard["searches"]["tpe+asha"]["epochs_to_target"] == [3]



def test_asha_replay_stops_a_trial_that_ranks_below_the_rung():
    """Two slots. Two bad trials start; the second ranks below the first at rung 1, so Ray's rule stops it
    and the good trial takes its slot at once. With no stopping the good trial waits for both to finish."""
    import random

    good = [{"val_joint_acc": a, "train_loss": loss} for a, loss in ((0.1, 2.0), (0.5, 1.0), (0.9, 0.5))]
    bad = [{"val_joint_acc": 0.2, "train_loss": 3.0}] * 3
    worse = [{"val_joint_acc": 0.2, "train_loss": 3.5}] * 3

    class Draws(random.Random):  # bad, worse, good, then bad ones
        def __init__(self):
            super().__init__(0)
            self.order = iter([1, 2, 0] + [1] * 10)

        def randrange(self, n):
            return next(self.order)

    pool = [good, bad, worse]
    # bad e1-e3 and worse e1-e3 take epochs 1-6; good e1, bad e1, good e2, bad e2, good e3: 11
    assert asha_replay.replay(pool, "none", None, [1], 3, [0.9], 100, Draws()) == [11]
    # worse stops after its first epoch (2); good takes its slot at epochs 4, 6 and 8
    assert asha_replay.replay(pool, "stop", "train_loss", [1], 3, [0.9], 100, Draws()) == [8]
    assert asha_replay.first_cut_keeps(pool, "train_loss", {0}) == 1


def test_layer_floor_times_every_convolution_and_batch_norm_of_the_model():
    for depth, layers in ((1, ["conv1", "bn1", "conv2", "bn2"]),
                          (2, ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "conv4", "bn4"])):
        config = TrainConfig.from_dict({"arch": "pixel", "width": 4, "depth": depth, "batch_size": 8})
        times = throughput.layer_floor_ms(config, "cpu", precision="fp32", reps=2)
        assert list(times) == layers
        assert all(ms > 0 for ms in times.values())


def test_bad_flags_are_refused_with_exit_2_before_any_work(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks"
    for args, message in ((["asha_replay.py", str(tmp_path), "--reduction-factor", "1"], "must be at least 2, got 1"),
                          (["sample_efficiency.py", "--budget", "4"], "--budget 4 is less than one trial's --epochs 8"),
                          (["sample_efficiency.py", "--targets", "1.5"], "strictly between 0 and 1, got 1.5"),
                          (["overhead.py", "--trials", "0"], "--trials: must be at least 1, got 0")):
        proc = subprocess.run([sys.executable, str(script / args[0]), *args[1:]], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "a refused benchmark wrote something"


def test_re_analysis_names_an_interrupted_run_instead_of_failing_on_it(tmp_path):
    (tmp_path / "random-seed0.yaml").write_text("name: random-seed0\nnum_samples: 2\nepochs: 2\n"
                                                "searcher: {type: random}\nscheduler: {type: none}\n")
    (tmp_path / "runs" / "random-seed0" / "trial_0").mkdir(parents=True)  # the sweep died before any report
    with pytest.raises(ValueError, match="random-seed0: no trial results; the run was interrupted"):
        sample_efficiency.load_searches([tmp_path])
    (tmp_path / "random-seed0.yaml").write_text("name: random-seed0\n")
    with pytest.raises(ValueError, match="lacks the key 'num_samples'"):
        sample_efficiency.load_searches([tmp_path])
