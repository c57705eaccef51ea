"""Faults during a launch: a killed trial worker, a non-finite loss, a tracking server that dies."""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from anas.genotypes import SHIPPED
from runner.trials import WORST_FID

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "runner" / "launch.py"

pytestmark = pytest.mark.slow

# The smoke budget cut to a few iterations.
SMALL = [
    "retrain.iterations=4",
    "retrain.eval_every=2",
    "metrics.search_n_generated=64",
]


def launcher_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=cwd,
        env=launcher_env(),
        stdout=subprocess.PIPE,
        stderr=open(cwd / "launch.log", "w"),  # noqa: SIM115
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, cwd: Path) -> tuple[int, str, str]:
    stdout, _ = process.communicate(timeout=900)
    return process.returncode, stdout, (cwd / "launch.log").read_text()


def wait_for(pattern: str, folder: Path, process: subprocess.Popen, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        assert process.poll() is None, f"launch ended with {process.returncode} before {pattern}"
        assert time.monotonic() < deadline, f"no {pattern} in {folder} after {timeout} s"
        time.sleep(0.2)


def parent_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parent, children


def leaderboard(output_dir: Path) -> list[dict]:
    with (output_dir / "leaderboard.csv").open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# A trial worker killed by pid is retried from its checkpoint.


@pytest.fixture(scope="module")
def killed_worker(tmp_path_factory, anas_cache_dir):
    cwd = tmp_path_factory.mktemp("killed_worker")
    output_dir = cwd / "run"
    process = start(
        cwd,
        f"output_dir={output_dir}",
        f"cache_dir={anas_cache_dir}",
        *SMALL,
        # Long enough after the first checkpoint that the worker is still alive to be killed,
        # also on a loaded machine.
        "search.iterations=16",
        "search.eval_every=2",
        "tune.max_failures=1",
    )
    checkpoint = wait_for("search/*/checkpoint_000000", output_dir, process)
    trial = checkpoint.parent
    pid = None
    while pid is None:
        result = trial / "result.json"
        lines = result.read_text().splitlines() if result.is_file() else []
        pid = json.loads(lines[0])["pid"] if lines else None
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        process.kill()
        pytest.fail(f"trial worker {pid} ended before the test could kill it")
    status, stdout, stderr = finish(process, cwd)
    return cwd, output_dir, trial.name, status, stderr


def test_killed_worker_launch_completes(killed_worker):
    _, output_dir, _, status, stderr = killed_worker
    assert status == 0, stderr[-3000:]
    assert len(leaderboard(output_dir)) == 2


def test_killed_worker_logged(killed_worker):
    _, _, trial, _, stderr = killed_worker
    retried = [line for line in stderr.splitlines() if "retried search trial" in line]
    assert len(retried) == 1
    assert trial in retried[0]


def test_killed_worker_tagged(killed_worker):
    cwd, _, trial, _, _ = killed_worker
    parent, _ = parent_run(MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}"))
    assert parent.data.tags["retried_trials"] == "1"
    assert parent.data.tags["failed_trials"] == "0"
    assert trial in parent.data.tags["trial_failures"]


def test_killed_worker_one_run(killed_worker):
    cwd, _, _, _, _ = killed_worker
    _, children = parent_run(MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}"))
    assert len(children) == 4
    assert {run.info.status for run in children} == {"FINISHED"}


# ---------------------------------------------------------------------------------------------
# A search whose generator learning rate makes the losses NaN.


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory, anas_cache_dir):
    cwd = tmp_path_factory.mktemp("nonfinite")
    output_dir = cwd / "run"
    process = start(
        cwd,
        f"output_dir={output_dir}",
        f"cache_dir={anas_cache_dir}",
        *SMALL,
        "search.iterations=4",
        "search.eval_every=2",
        "search.seeds=[0]",
        "retrain.seeds=[0]",
        "~search.space.g_lr",
        "~search.space.d_lr",
        "search.g_lr=1e30",
        "search.d_lr=1e30",
        f"retrain.baselines=[{sorted(SHIPPED)[0]}]",
    )
    status, stdout, stderr = finish(process, cwd)
    return cwd, output_dir, status, stderr


def test_nonfinite_launch_completes(nonfinite):
    _, output_dir, status, stderr = nonfinite
    assert status == 0, stderr[-3000:]
    rows = leaderboard(output_dir)
    assert [row["candidate"] for row in rows] == [f"baseline-{sorted(SHIPPED)[0]}"]


def test_nonfinite_trial_tagged(nonfinite):
    cwd, _, _, _ = nonfinite
    _, children = parent_run(MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}"))
    (search,) = [run for run in children if run.data.tags["stage"] == "search"]
    assert search.info.status == "FAILED"
    assert search.data.tags["failure"].startswith("non-finite: ")


def test_nonfinite_never_logged(nonfinite):
    cwd, _, _, _ = nonfinite
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    parent, children = parent_run(client)
    values = [
        point.value
        for run in [parent, *children]
        for key in run.data.metrics
        for point in client.get_metric_history(run.info.run_id, key)
    ]
    assert values
    assert all(math.isfinite(value) for value in values)


def test_nonfinite_worst_for_optuna(nonfinite):
    _, output_dir, _, _ = nonfinite
    (state_file,) = (output_dir / "search").glob("searcher-state-*.pkl")
    state = json.loads(state_file.read_text())
    assert state["reported"] == {"configuration_0": WORST_FID}


# ---------------------------------------------------------------------------------------------
# The MLflow tracking server is killed while the search stage runs.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server_lost(tmp_path_factory, anas_cache_dir):
    cwd = tmp_path_factory.mktemp("server_lost")
    port = free_port()
    server = start_server(cwd, port)
    try:
        output_dir = cwd / "run"
        process = start(
            cwd,
            f"output_dir={output_dir}",
            f"cache_dir={anas_cache_dir}",
            *SMALL,
            "search.iterations=4",
            "search.eval_every=2",
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
            "mlflow.request_timeout_s=2",
            "mlflow.max_retries=1",
        )
        wait_for("search/*/checkpoint_000000", output_dir, process)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    status, stdout, stderr = finish(process, cwd)
    return output_dir, status, stdout, stderr


def test_server_lost_launch_completes(server_lost):
    output_dir, status, stdout, stderr = server_lost
    assert status == 0, stderr[-3000:]
    assert "| rank |" in stdout
    assert len(leaderboard(output_dir)) == 2


def test_server_lost_reported(server_lost):
    _, _, _, stderr = server_lost
    lines = [line for line in stderr.splitlines() if "could not log" in line]
    assert any("run launch" in line or "(run " in line for line in lines), stderr[-3000:]
