"""Beyond one machine: cluster examples, the Ray Jobs API, a local multi-node cluster, node loss, GPU requests."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tune.config import load_experiment
from tune.sweep import trial_constants, trial_resources

from .conftest import REPO, write_dataset
from .sweeps import read_trials_csv, sweep_env, tiny_experiment

pytestmark = pytest.mark.slow


def test_cluster_examples_parse_and_name_the_entrypoint():
    launcher = yaml.safe_load((REPO / "experiments/cluster/aws.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    workers = [t for name, t in launcher["available_node_types"].items() if name != launcher["head_node_type"]]
    assert workers and workers[0]["node_config"]["InstanceType"].startswith("g")  # GPU workers
    assert any("pip install -e ." in c for c in launcher["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in launcher["head_start_ray_commands"])
    head = launcher["available_node_types"][launcher["head_node_type"]]  # runs the driver, and no trials
    assert head["resources"] == {"CPU": 0} and any("--num-cpus=0" in c for c in launcher["head_start_ray_commands"])

    job = yaml.safe_load((REPO / "experiments/cluster/rayjob.yaml").read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "tune", "sweep"] and (REPO / entry[4]).is_file()
    assert "--storage" in entry and entry[entry.index("--storage") + 1].startswith("s3://")

    readme = (REPO / "README.md").read_text()
    assert "ray job submit --working-dir . -- python -m tune sweep experiments/default.yaml --storage s3://" in readme


def test_gpu_experiment_requests_fractional_gpus():
    gpu = load_experiment(REPO / "experiments/gpu.yaml")
    assert trial_resources(gpu) == {"cpu": 2, "gpu": 0.25}
    constants = trial_constants(gpu)
    assert constants["device"] == "cuda" and constants["threads"] == 2 and constants["epochs"] == 10
    assert gpu.max_concurrent == 4  # four trials share one GPU
    cpu = load_experiment(REPO / "experiments/default.yaml")
    assert trial_resources(cpu)["gpu"] == 0 and trial_constants(cpu)["device"] == "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_matching(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (this test's private paths)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_jobs_api_runs_a_sweep_on_a_loopback_head(tmp_path):

    experiment = tiny_experiment(tmp_path, name="viajobs", num_samples=2, epochs=1)
    shared = tmp_path / "shared"
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Free ports for everything the Jobs API needs: the agent's default HTTP port (52365) is taken
    # by any other Ray on the machine, and then no agent can accept the job.
    port, dashboard_port, agent_port = _free_port(), _free_port(), _free_port()
    env = {**sweep_env(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # Ray's token authentication stays on: the head, the job and the client share a fresh token.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    start = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={agent_port}",
         "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        # `ray job submit` waits for the job and exits non-zero unless it SUCCEEDED. The head's job
        # agent comes up a few seconds after `ray start` returns; until then submissions bounce.
        deadline = time.monotonic() + 120
        while True:
            submit = subprocess.run(
                ["ray", "job", "submit", f"--address=http://127.0.0.1:{dashboard_port}", f"--working-dir={REPO}",
                 "--", "python", "-m", "tune", "sweep", str(experiment), "--storage", str(shared), "--quiet"],
                env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        trials = read_trials_csv(shared / "viajobs" / "trials.csv")
        assert len(trials) == 2 and (trials["trial_status"] == "completed").all()
        assert (shared / "viajobs" / "optuna.journal").is_file() and (shared / "viajobs" / "best_config.yaml").is_file()
    finally:
        _kill_matching(temp_dir)
        _kill_matching(str(tmp_path))


@pytest.fixture
def three_nodes(tmp_path):
    """A head and two worker nodes with 1 CPU each. The workers cannot see any dataset files."""
    from ray.cluster_utils import Cluster

    no_data = {"DUALNET_DATA_DIR": str(tmp_path / "no-data-here"), "DUALNET_CACHE_DIR": str(tmp_path / "no-cache")}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, env_vars=no_data) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()


def _node_ids(result_json: Path) -> list[str]:
    return [json.loads(line)["node_id"] for line in result_json.read_text().splitlines() if line.strip()]


def _cluster_experiment(tmp_path: Path, name: str) -> Path:
    write_dataset(tmp_path / "idx", n_train=6000, n_test=300)
    return tiny_experiment(tmp_path, name=name, num_samples=4, max_concurrent=3, epochs=3, max_failures=3,
                           scheduler={"type": "none"}, data={"dir": str(tmp_path / "idx"), "val_size": 300},
                           space={"arch": {"choice": ["late", "pixel"]}, "width": 8, "hidden": 64,
                                  "lr": {"loguniform": [2e-3, 1e-2]}})


def test_multi_node_sweep_spreads_trials_and_ships_data_through_the_object_store(tmp_path, three_nodes):
    cluster, workers = three_nodes
    experiment = _cluster_experiment(tmp_path, "multinode")
    proc = subprocess.run([sys.executable, "-m", "tune", "sweep", str(experiment), "--address", cluster.address],
                          cwd=REPO, env=sweep_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "must be a shared mount" in proc.stderr
    run_dir = tmp_path / "runs" / "multinode"
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["trial_status"] == "completed").all()
    used = {node for t in trials["trial_id"] for node in _node_ids(run_dir / t / "result.json")}
    assert len(used) >= 2, "all trials landed on one node"
    assert used & {w.node_id for w in workers}, "no trial ran on a worker node without the dataset"


def test_losing_a_worker_node_mid_sweep_retries_its_trials_elsewhere(tmp_path, three_nodes):
    cluster, workers = three_nodes
    experiment = _cluster_experiment(tmp_path, "nodeloss")
    run_dir = tmp_path / "runs" / "nodeloss"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "tune", "sweep", str(experiment), "--address", cluster.address],
                                  cwd=REPO, env=sweep_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    victim = workers[1]
    try:
        deadline = time.monotonic() + 300
        hit = None
        while hit is None and time.monotonic() < deadline:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            for result in run_dir.glob("*/result.json"):
                ids = _node_ids(result)
                if ids and ids[-1] == victim.node_id and len(ids) < 3:
                    hit = result.parent.name
            time.sleep(0.2)
        assert hit, "no trial reported from the worker node in time"
        cluster.remove_node(victim, allow_graceful=False)
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    trials = read_trials_csv(run_dir / "trials.csv")
    assert len(trials) == 4 and (trials["trial_status"] == "completed").all()
    rows = [json.loads(line) for line in (run_dir / hit / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3], "the moved trial's history has a gap or a duplicate"
    assert rows[-1]["node_id"] != victim.node_id, "the trial did not move off the lost node"


def test_confirm_on_a_joined_cluster_waits_for_a_node_big_enough(tmp_path):
    """A cluster joined through RAY_ADDRESS may autoscale: a task bigger than it is now gets a note and
    waits, and runs once a node that fits joins (here added by hand, as an autoscaler would)."""
    from ray.cluster_utils import Cluster

    write_dataset(tmp_path / "idx", n_train=1000, n_test=200)
    config = tmp_path / "late.yaml"
    config.write_text(yaml.safe_dump({"arch": "late", "width": 4, "hidden": 16, "epochs": 1}))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    try:
        with open(tmp_path / "confirm.log", "w") as log:
            confirm = subprocess.Popen(
                [sys.executable, "-m", "tune", "confirm", str(config), "--seeds", "1", "--cpus-per-task", "2",
                 "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "idx"), "--no-download"],
                cwd=REPO, env={**sweep_env(tmp_path), "RAY_ADDRESS": cluster.address}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "note: --cpus-per-task: each run asks for 2 CPUs but the Ray cluster has 1 now" not in (tmp_path / "confirm.log").read_text():
                assert confirm.poll() is None and time.monotonic() < deadline, (tmp_path / "confirm.log").read_text()
                time.sleep(0.2)
            time.sleep(2)
            assert confirm.poll() is None, "confirm ended before a node big enough joined"
            cluster.add_node(num_cpus=2)
            assert confirm.wait(timeout=300) == 0, (tmp_path / "confirm.log").read_text()[-3000:]
        finally:
            if confirm.poll() is None:
                os.killpg(confirm.pid, signal.SIGKILL)
    finally:
        cluster.shutdown()
    report = json.loads((tmp_path / "out" / "confirm.json").read_text())
    assert [(r["arch"], r["seed"]) for r in report["runs"]] == [("late", 0)]
