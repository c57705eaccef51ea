"""Joining Ray clusters: storage paths, token authentication, a launch across two nodes.

The slow tests start a two-node cluster with `ray start` on loopback addresses, one CPU per
node so that concurrent trials must spread, with token authentication on. The head listens on
127.0.0.2 and the worker on 127.0.0.3: Ray 2.60 replaces 127.0.0.1 by the machine's outward
address (ray/_private/services.py, resolve_ip_for_localhost) but keeps other loopback addresses.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import pytest
from mlflow.tracking import MlflowClient

from anas.errors import ConfigError
from runner import cluster
from runner.config import compose

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "runner" / "launch.py"
RAY = Path(sys.executable).with_name("ray")

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# A leftover token file that Ray itself cannot send (it aborts on it inside gRPC).
STALE_TOKEN = b"stale\x01token\xff\n"
# The smoke budget with one evaluation per trial, at its end, to save test time.
ONE_EVALUATION = ("search.eval_every=20", "retrain.eval_every=40")
NODE_START_TIMEOUT_S = 120
NODE_STOP_TIMEOUT_S = 60


def compose_in(tmp_path: Path, *overrides: str) -> dict:
    return compose([f"output_root={tmp_path}/outputs", *overrides], base_dir=tmp_path)


def launch_cfg(**ray) -> dict:
    """A minimal config for the functions of runner.cluster that read `ray`."""
    settings = {"address": None, "auth_mode": "token", "token_file": None, "ship_code": False}
    return {"ray": {**settings, **ray}}


def write_stale_token(home: Path) -> Path:
    path = home / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(STALE_TOKEN)
    return path


# ---------------------------------------------------------------------------------------------
# Storage paths.


@pytest.mark.parametrize(
    "uri", ["s3://bucket/runs", "gs://bucket/runs", "abfs://container/runs", "file:///tmp/runs"]
)
def test_storage_uri_passed_through(tmp_path, uri):
    cfg = compose_in(tmp_path, f"storage.path={uri}")
    assert cfg["storage"]["path"] == uri


def test_storage_relative_path_absolute(tmp_path):
    cfg = compose_in(tmp_path, "storage.path=shared/ray")
    assert cfg["storage"]["path"] == str(tmp_path / "shared" / "ray")


@pytest.mark.parametrize("uri", ["ftp://host/runs", "http://host/runs", "redis://host/0"])
def test_storage_scheme_rejected(tmp_path, uri):
    with pytest.raises(ConfigError, match=r"^storage\.path: unsupported URI scheme"):
        compose_in(tmp_path, f"storage.path={uri}")


def test_storage_uri_without_bucket_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"^storage\.path: .* names no bucket"):
        compose_in(tmp_path, "storage.path=s3:///runs")


def test_launch_storage_default_is_output_dir(tmp_path):
    cfg = compose_in(tmp_path, "output_dir=runs/first")
    assert cluster.launch_storage(cfg) == str(tmp_path / "runs" / "first")


def test_launch_storage_under_storage_path(tmp_path):
    cfg = compose_in(tmp_path, "output_dir=runs/first", "storage.path=shared")
    assert cluster.launch_storage(cfg) == str(tmp_path / "shared" / "digits" / "first")


def test_launch_storage_uri_keeps_query(tmp_path):
    uri = "s3://bucket/runs?endpoint_override=localhost:9000"
    cfg = compose_in(tmp_path, "output_dir=runs/first", f"storage.path='{uri}'")
    expected = "s3://bucket/runs/digits/first?endpoint_override=localhost:9000"
    assert cluster.launch_storage(cfg) == expected


def test_read_storage_text_local_and_pyarrow(tmp_path):
    (tmp_path / "error.txt").write_text("boom\n")
    local = pyarrow.fs.LocalFileSystem()
    assert cluster.read_storage_text(str(tmp_path / "error.txt")) == "boom\n"
    assert cluster.read_storage_text(str(tmp_path / "error.txt"), local) == "boom\n"
    assert cluster.read_storage_text(str(tmp_path / "missing.txt"), local) is None


def test_probe_paths(tmp_path):
    (tmp_path / "marker").write_text("")
    (tmp_path / "readonly").mkdir(mode=0o500)
    checks = [
        ("cache_dir", str(tmp_path / "new" / "cache"), "writable"),
        ("storage.path", str(tmp_path / "marker"), "marker"),
        ("storage.path", str(tmp_path / "elsewhere" / "marker"), "marker"),
        ("data.root", str(tmp_path / "absent"), "exists"),
        ("cache_dir", str(tmp_path / "marker" / "cache"), "writable"),
    ]
    problems = cluster.probe_paths(checks)
    assert (tmp_path / "new" / "cache").is_dir()
    assert [key for key, _ in problems] == ["storage.path", "data.root", "cache_dir"]


# ---------------------------------------------------------------------------------------------
# Token authentication and the runtime environment.


def test_ray_keys_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"^ray\.auth_mode: expected token or disabled"):
        compose_in(tmp_path, "ray.auth_mode=tls")


def test_ray_token_file_made_absolute(tmp_path):
    cfg = compose_in(tmp_path, "ray.token_file=secrets/token")
    assert cfg["ray"]["token_file"] == str(tmp_path / "secrets" / "token")


def test_ray_address_from_environment():
    assert cluster.ray_address(launch_cfg(), {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    assert cluster.ray_address(launch_cfg(address="auto"), {"RAY_ADDRESS": "x:1"}) == "auto"
    assert cluster.ray_address(launch_cfg(), {}) is None
    assert cluster.ray_address(launch_cfg(address="local"), {}) is None


def test_local_start_ignores_stale_token(tmp_path):
    write_stale_token(tmp_path)
    environ = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / ".ray/auth_token")}
    source = cluster.configure_auth(launch_cfg(), joining=False, environ=environ)
    assert environ["RAY_AUTH_MODE"] == "token"
    assert len(environ["RAY_AUTH_TOKEN"]) == 64
    assert "RAY_AUTH_TOKEN_PATH" not in environ
    assert source == "a fresh token for this launch"


def test_joining_rejects_stale_default_token(tmp_path):
    write_stale_token(tmp_path)
    with pytest.raises(ConfigError, match=r"^ray\.token_file: .* does not contain a Ray token"):
        cluster.configure_auth(launch_cfg(), joining=True, environ={"HOME": str(tmp_path)})


def test_joining_without_token_names_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"^ray\.token_file: .*ray\.auth_mode=disabled"):
        cluster.configure_auth(launch_cfg(), joining=True, environ={"HOME": str(tmp_path)})


def test_token_file_preferred_and_stripped(tmp_path):
    write_stale_token(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("  abc123  \n")
    environ = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "other"}
    cfg = launch_cfg(token_file=str(token_file))
    cluster.configure_auth(cfg, joining=True, environ=environ)
    assert environ["RAY_AUTH_TOKEN"] == "abc123"


def test_joining_uses_token_path_variable(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-path\n")
    environ = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token_file)}
    cluster.configure_auth(launch_cfg(), joining=True, environ=environ)
    assert environ["RAY_AUTH_TOKEN"] == "from-path"


def test_missing_token_file_rejected(tmp_path):
    cfg = launch_cfg(token_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^ray\.token_file: token file .* not found"):
        cluster.configure_auth(cfg, joining=False, environ={})


def test_auth_disabled_sets_mode_only():
    environ = {}
    cluster.configure_auth(launch_cfg(auth_mode="disabled"), joining=True, environ=environ)
    assert environ == {"RAY_AUTH_MODE": "disabled"}


def test_runtime_env_ships_packages():
    environ = {"MLFLOW_TRACKING_USERNAME": "someone", "HOME": "/home/someone"}
    runtime = cluster.runtime_env(launch_cfg(ship_code=True), "http://127.0.0.1:5000", environ)
    assert runtime["env_vars"] == {
        "MLFLOW_TRACKING_USERNAME": "someone",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    }
    names = [Path(path).name for path in runtime["py_modules"]]
    assert names == ["anas", "runner", "experiments"]
    assert all((Path(path) / "__init__.py").is_file() for path in runtime["py_modules"])
    assert "__pycache__" in runtime["excludes"]


def test_runtime_env_without_shipping():
    runtime = cluster.runtime_env(launch_cfg(), "sqlite:////tmp/mlflow.db", {})
    assert "py_modules" not in runtime


# ---------------------------------------------------------------------------------------------
# Ray started or joined with a stale ~/.ray/auth_token in a temporary HOME, which Ray itself
# would read and abort on. The launch against an MLflow server (test_mlflow_server.py) runs
# with such a HOME as well.


def launcher_env(home: Path) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_", "MLFLOW_")) and key != "HOME"
    }
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_launch(cwd: Path, home: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=cwd,
        env=launcher_env(home),
        capture_output=True,
        text=True,
        timeout=1200,
    )


# Starts a local Ray the way a launch does, then runs one task on it.
CONNECT_LOCALLY = """
import sys
import ray
from runner import cluster
from runner.config import compose

cfg = compose([f"output_root={sys.argv[1]}"])
assert cluster.connect(cfg, f"sqlite:///{sys.argv[1]}/mlflow.db")
print(ray.get(ray.remote(lambda: "task ran").remote()))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_with_stale_token(tmp_path):
    home = tmp_path / "home"
    stale = write_stale_token(home)
    # Short, because Ray's socket paths under it must fit the 107-byte limit of Unix sockets.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="anas-ray-"))
    env = {**launcher_env(home), "RAY_TMPDIR": str(ray_tmpdir), "PYTHONPATH": str(REPOSITORY)}
    try:
        result = subprocess.run(
            [sys.executable, "-c", CONNECT_LOCALLY, str(tmp_path / "outputs")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("task ran")
    assert stale.read_bytes() == STALE_TOKEN


# The two-node cluster.


@dataclass
class RayCluster:
    address: str
    token_file: Path
    temp_dir: Path
    node_ids: list[str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Options giving a node its own ports, so two nodes can share one machine."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{name}={free_port()}" for name in names]


def start_node(options: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start `ray start --block` in its own session; ending that process stops the node."""
    command = [str(RAY), "start", "--block", "--num-cpus=1", "--num-gpus=0", *options]
    command += ["--object-store-memory=100000000", "--disable-usage-stats", *node_ports()]
    with log.open("w") as stream:
        return subprocess.Popen(
            command, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited: {log.read_text()[-3000:]}"
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Ray's GCS did not open {host}:{port}")


WAIT_FOR_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="WARNING")
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    if len(alive) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(1)
print(json.dumps(alive))
"""


def wait_for_nodes(address: str, count: int, env: dict) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", WAIT_FOR_NODES, address, str(count), str(NODE_START_TIMEOUT_S)],
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_START_TIMEOUT_S + 60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


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


def stop_nodes(processes: list[subprocess.Popen]) -> None:
    """Stop each node like `ray stop` would, but only the processes these nodes started."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    time.sleep(1)
    for process in processes:
        for pid in session_members(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    token = secrets.token_hex(32)
    token_file = folder / "ray_auth_token"
    token_file.write_text(token + "\n")
    home = folder / "home"
    write_stale_token(home)
    # Short, because Ray's socket paths under it must fit the 107-byte limit of Unix sockets.
    temp_dir = Path(tempfile.mkdtemp(prefix="anas-ray-"))
    env = {**launcher_env(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    processes: list[subprocess.Popen] = []
    try:
        port = free_port()
        head_log = folder / "head.log"
        head = start_node(
            ["--head", f"--node-ip-address={HEAD_IP}", f"--port={port}"]
            + ["--include-dashboard=false", f"--temp-dir={temp_dir}"],
            env,
            head_log,
        )
        processes.append(head)
        wait_for_port(HEAD_IP, port, head, head_log)
        address = f"{HEAD_IP}:{port}"
        worker = [f"--address={address}", f"--node-ip-address={WORKER_IP}"]
        processes.append(start_node(worker, env, folder / "worker.log"))
        node_ids = wait_for_nodes(address, 2, env)
        assert len(node_ids) == 2, f"the worker node did not join: {node_ids}"
        yield RayCluster(address, token_file, temp_dir, node_ids)
    finally:
        stop_nodes(processes)
        shutil.rmtree(temp_dir, ignore_errors=True)


def reported(stage_folder: Path) -> list[dict]:
    """Every result a stage's trials reported, from Ray Tune's result.json files."""
    results = []
    for path in sorted(stage_folder.glob("*/result.json")):
        results += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return results


@pytest.mark.slow
def test_launch_on_two_nodes(ray_cluster, tmp_path, anas_cache_dir):
    home = tmp_path / "home"
    stale = write_stale_token(home)
    storage = tmp_path / "shared"
    result = run_launch(
        tmp_path,
        home,
        f"ray.address={ray_cluster.address}",
        f"ray.token_file={ray_cluster.token_file}",
        "ray.ship_code=true",
        f"storage.path={storage}",
        "output_dir=outputs/two-nodes",
        f"cache_dir={anas_cache_dir}",
        *ONE_EVALUATION,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| rank |" in result.stdout

    launch_storage = storage / "digits" / "two-nodes"
    for stage in ("search", "retrain"):
        trials = [path for path in (launch_storage / stage).iterdir() if path.is_dir()]
        assert len(trials) == 2, f"{stage}: trial folders {trials}"
        for trial in trials:
            assert list(trial.glob("checkpoint_*")), f"{trial} has no checkpoint"
        node_ids = {row["node_id"] for row in reported(launch_storage / stage)}
        assert node_ids == set(ray_cluster.node_ids), f"{stage} ran on {node_ids}"

    output_dir = tmp_path / "outputs" / "two-nodes"
    assert (output_dir / "leaderboard.csv").is_file()
    assert not (output_dir / "search").exists()
    shipped = ray_cluster.temp_dir.glob("session_*/runtime_resources/py_modules_files/*")
    assert list(shipped), "the packages were not shipped through the runtime environment"
    strays = [*tmp_path.rglob("mlruns"), *ray_cluster.temp_dir.rglob("mlruns")]
    assert not strays, f"local MLflow stores: {strays}"
    assert stale.read_bytes() == STALE_TOKEN

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(children) == 4
    assert {run.info.status for run in runs} == {"FINISHED"}


@pytest.mark.slow
def test_wrong_token_rejected(ray_cluster, tmp_path):
    home = tmp_path / "home"
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    result = run_launch(
        tmp_path, home, f"ray.address={ray_cluster.address}", f"ray.token_file={wrong}"
    )
    assert result.returncode == 2, result.stderr[-4000:]
    assert "error: ray.token_file: the Ray cluster at" in result.stderr


# Joins the cluster at argv[1] and runs the node check with the config of the overrides after it.
CHECK_NODES = """
import sys
import ray
from anas.errors import ConfigError
from runner import cluster
from runner.config import compose

cfg = compose(sys.argv[2:])
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="WARNING")
try:
    cluster.check_nodes(cfg, "http://127.0.0.1:5000")
    print("passed")
except ConfigError as error:
    print(error)
"""


@pytest.mark.slow
def test_node_check_names_key(ray_cluster, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "-c", CHECK_NODES, ray_cluster.address]
        + [f"output_root={tmp_path}/outputs", f"cache_dir={blocker}/cache"],
        cwd=tmp_path,
        env={
            **launcher_env(tmp_path / "home"),
            "PYTHONPATH": str(REPOSITORY),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": ray_cluster.token_file.read_text().strip(),
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    message = result.stdout.strip().splitlines()[-1]
    assert message.startswith("cache_dir: on node 127.0.0."), message
    assert f"cannot create {blocker}/cache" in message
