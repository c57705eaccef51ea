"""A launch logging to a real MLflow server: PostgreSQL backend, artifacts served by the server.

Needs the PostgreSQL that .ci/run installs and starts. The test creates its own role and
database there and drops both at the end. Outside CI it is skipped when PostgreSQL is missing.
"""

import csv
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "runner" / "launch.py"
MLFLOW = Path(sys.executable).with_name("mlflow")

pytestmark = pytest.mark.services

# On a fresh database, MLflow runs its schema migrations before /health responds.
SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 30
STALE_TOKEN = b"stale\x01token\xff\n"


# ---------------------------------------------------------------------------------------------
# PostgreSQL.


def psql_command() -> list[str]:
    """Return the psql command of the database superuser: runuser when root, else this user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return [*prefix, "psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"]


def psql(sql: str, database: str = "postgres") -> str:
    result = subprocess.run(
        [*psql_command(), "-d", database, "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"psql failed on {sql!r}: {result.stderr}"
    return result.stdout.strip()


def missing_postgres() -> str | None:
    """Return why PostgreSQL cannot be used here, or None when it can."""
    for program in ("psql", "pg_isready"):
        if shutil.which(program) is None:
            return f"{program} not found"
    if subprocess.run(["pg_isready", "-q"], timeout=30).returncode != 0:
        return "PostgreSQL is not accepting connections (pg_isready)"
    probe = subprocess.run(
        [*psql_command(), "-d", "postgres", "-c", "select 1"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot connect as a database superuser: {probe.stderr.strip()}"
    return None


@pytest.fixture
def postgres_uri():
    """Create a role and a database for one test; yield the database's SQLAlchemy URI and name."""
    reason = missing_postgres()
    if reason and os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs and starts PostgreSQL")
    if reason:
        pytest.skip(f"{reason}; run .ci/run, or install PostgreSQL and start it")
    name = f"anas_test_{secrets.token_hex(4)}"
    password = secrets.token_hex(16)
    port = psql("show port")
    psql(f"create role {name} login password '{password}'")
    try:
        psql(f"create database {name} owner {name}")
        yield f"postgresql+psycopg2://{name}:{password}@127.0.0.1:{port}/{name}", name
    finally:
        psql(f"drop database if exists {name} with (force)")
        psql(f"drop role if exists {name}")


# ---------------------------------------------------------------------------------------------
# The MLflow server.


@dataclass
class Server:
    uri: str
    artifacts: Path
    database: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_members(session_id: int) -> list[int]:
    """Return the ids of the processes in session `session_id` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name: state, ppid, pgrp, session, ...
        if int(stat.rsplit(")", 1)[1].split()[3]) == session_id:
            members.append(int(entry.name))
    return members


def wait_for_health(uri: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise TimeoutError(
        f"mlflow server at {uri} did not respond on /health: {log.read_text()[-3000:]}"
    )


@pytest.fixture
def mlflow_server(postgres_uri, tmp_path):
    database_uri, database = postgres_uri
    folder = tmp_path / "server"
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [str(MLFLOW), "server", "--backend-store-uri", database_uri]
    command += ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    log = folder / "server.log"
    with log.open("w") as stream:
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_health(uri, process, log)
        yield Server(uri, artifacts, database)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in session_members(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_tmpdir():
    """A short folder for Ray's session (trial working folders included), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="anas-ray-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The launch.


def test_launch_logs_to_server(mlflow_server, tmp_path, ray_tmpdir, anas_cache_dir):
    cwd = tmp_path / "launch"
    cwd.mkdir()
    # A leftover token file that Ray itself would read and abort on; the launch must ignore it.
    stale_token = tmp_path / "home" / ".ray" / "auth_token"
    stale_token.parent.mkdir(parents=True)
    stale_token.write_bytes(STALE_TOKEN)
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "RAY_"))
    }
    env |= {"HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(ray_tmpdir)}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            sys.executable,
            str(LAUNCHER),
            f"mlflow.tracking_uri={mlflow_server.uri}",
            "output_dir=outputs/server",
            f"cache_dir={anas_cache_dir}",
            # One evaluation per trial, at its end, to save test time.
            "search.eval_every=20",
            "retrain.eval_every=40",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    output_dir = cwd / "outputs" / "server"

    # Runs and metrics, read back through the server.
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_id
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        history = client.get_metric_history(child.info.run_id, "fid")
        assert history, f"run {child.info.run_id} has no FID history"
        genotypes = client.list_artifacts(child.info.run_id, "genotypes")
        assert genotypes, f"run {child.info.run_id} has no genotype artifacts"
    stages = sorted(child.data.tags["stage"] for child in children)
    assert stages == ["retrain", "retrain", "search", "search"]

    # Artifacts, stored by the server in its artifacts destination.
    downloaded = client.download_artifacts(parents[0].info.run_id, "leaderboard.csv", tmp_path)
    with open(downloaded) as stream:
        served = list(csv.DictReader(stream))
    with open(output_dir / "leaderboard.csv") as stream:
        written = list(csv.DictReader(stream))
    assert served == written
    assert list(mlflow_server.artifacts.rglob("leaderboard.csv"))

    # The runs are rows of the PostgreSQL database.
    count = psql(
        f"select count(*) from runs where experiment_id = {int(experiment.experiment_id)}",
        mlflow_server.database,
    )
    assert int(count) == len(runs)

    # No process fell back to a local store in its working folder.
    strays = [*cwd.rglob("mlruns"), *cwd.rglob("mlartifacts"), *ray_tmpdir.rglob("mlruns")]
    assert not strays, f"local MLflow stores: {strays}"
    assert stale_token.read_bytes() == STALE_TOKEN
