"""A launch killed with SIGKILL twice and resumed ranks the same as one never interrupted."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "runner" / "launch.py"

pytestmark = pytest.mark.slow

# The smoke budget cut further: three evaluations per trial, so that Tune records a
# checkpoint before the last one.
SMALL = [
    "search.iterations=6",
    "search.eval_every=2",
    "retrain.iterations=6",
    "retrain.eval_every=2",
    "metrics.search_n_generated=64",
]
LEADERBOARD_KEYS = ("genotype", "seed", "fid")


def launcher_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    """Start the launcher in its own session, with stderr in cwd/launch-N.log."""
    number = len(list(cwd.glob("launch-*.log")))
    log = open(cwd / f"launch-{number}.log", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=cwd,
        env=launcher_env(),
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )


def finish(process: subprocess.Popen) -> int:
    return process.wait(timeout=900)


def session_processes(session: int) -> list[int]:
    """Return the pids of the processes in session `session` (fields of /proc/PID/stat)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_for_recorded_checkpoint(stage: Path, process: subprocess.Popen) -> None:
    """Wait until Tune's experiment state of `stage` was saved after a trial checkpoint.

    A resumed stage only knows the checkpoints that its last saved state names.
    """
    deadline = time.monotonic() + 600
    while True:
        assert process.poll() is None, f"launch ended with {process.returncode}"
        assert time.monotonic() < deadline, f"no recorded checkpoint in {stage} after 600 s"
        written = [path.stat().st_mtime for path in stage.glob("*/checkpoint_*/state.pt")]
        saved = [path.stat().st_mtime for path in stage.glob("experiment_state-*.json")]
        if written and saved and max(saved) > min(written):
            return
        time.sleep(0.2)


def kill_launch(process: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher alone; return the pids of its session still alive 20 s later.

    Ray's GCS server and raylet share the launcher's fate, and the trial workers end with the
    raylet. Ray's dashboard and runtime-env agents can linger a while; the caller kills them.
    """
    session = process.pid  # start_new_session: the launcher leads its own session
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        remaining = session_processes(session)
        commands = [command_line(pid) for pid in remaining]
        if not any("raylet" in c or "gcs_server" in c or "ImplicitFunc" in c for c in commands):
            break
        time.sleep(0.5)
    return session_processes(session)


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree_state(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def leaderboard(output_dir: Path) -> list[tuple]:
    with (output_dir / "leaderboard.csv").open() as f:
        return [tuple(row[k] for k in LEADERBOARD_KEYS) for row in csv.DictReader(f)]


def check_killed_launch_stopped(process: subprocess.Popen, output_dir: Path) -> None:
    remaining = kill_launch(process)
    workers = [pid for pid in remaining if "ImplicitFunc" in command_line(pid)]
    assert workers == [], f"trial workers still running: {workers}"
    ray_core = [pid for pid in remaining if "raylet" in command_line(pid)]
    assert ray_core == [], f"raylet still running: {ray_core}"
    for pid in remaining:  # Ray's agents, which write nothing to output_dir
        os.kill(pid, signal.SIGKILL)
    before = tree_state(output_dir)
    time.sleep(3)
    assert tree_state(output_dir) == before


@pytest.fixture(scope="module")
def launches(tmp_path_factory, anas_cache_dir):
    """Run one launch straight through and one killed twice and resumed; return both folders."""
    cwd = tmp_path_factory.mktemp("resume")
    common = [*SMALL, f"cache_dir={anas_cache_dir}"]
    straight, resumed = cwd / "straight", cwd / "resumed"

    assert finish(start(cwd, f"output_dir={straight}", *common)) == 0

    process = start(cwd, f"output_dir={resumed}", *common)
    wait_for_recorded_checkpoint(resumed / "search", process)
    check_killed_launch_stopped(process, resumed)
    assert not (resumed / "handoff.json").exists()

    process = start(cwd, f"output_dir={resumed}", "resume=true")
    wait_for_recorded_checkpoint(resumed / "retrain", process)
    check_killed_launch_stopped(process, resumed)
    assert (resumed / "handoff.json").exists()

    assert finish(start(cwd, f"output_dir={resumed}", "resume=true")) == 0
    return cwd, straight, resumed


def test_resumed_leaderboard_equal(launches):
    _, straight, resumed = launches
    assert leaderboard(resumed) == leaderboard(straight)


def test_resumed_leaderboard_filled(launches):
    _, _, resumed = launches
    assert len(leaderboard(resumed)) == 2


def test_no_run_left_running(launches):
    cwd, _, _ = launches
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    running = [run.info.run_id for run in runs if run.info.status == "RUNNING"]
    assert running == []


def resumed_runs(cwd: Path, resumed: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [
        run
        for run in runs
        if "mlflow.parentRunId" not in run.data.tags
        and run.data.tags.get("output_dir") == str(resumed)
    ]
    return runs, parents


def test_one_parent_run(launches):
    cwd, _, resumed = launches
    _, parents = resumed_runs(cwd, resumed)
    assert len(parents) == 1


def test_parent_run_resumed_twice(launches):
    cwd, _, resumed = launches
    _, parents = resumed_runs(cwd, resumed)
    assert parents[0].data.tags.get("resumes") == "2"
    assert parents[0].info.status == "FINISHED"


def test_one_run_per_trial(launches):
    cwd, _, resumed = launches
    runs, parents = resumed_runs(cwd, resumed)
    children = [
        run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    ]
    trial_ids = [run.data.tags["trial_id"] for run in children]
    assert len(trial_ids) == 4
    assert len(set(trial_ids)) == len(trial_ids)
    assert {run.info.status for run in children} == {"FINISHED"}


def test_search_stage_not_repeated(launches):
    cwd, _, _ = launches
    last = (cwd / "launch-3.log").read_text()
    assert "search ended before" in last
    assert "search stage: 2 trials" not in last


def test_search_stage_resumed(launches):
    cwd, _, _ = launches
    assert "search stage: resuming" in (cwd / "launch-2.log").read_text()


def test_unrecorded_parent_closed(tmp_path, monkeypatch):
    """A parent run that launch.json never recorded is closed when the launch resumes."""
    from runner.config import compose
    from runner.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose([f"output_root={tmp_path}", f"output_dir={tmp_path}/run"], base_dir=tmp_path)
    earlier = Tracker.start(cfg)  # left RUNNING, as by a launch killed at this point
    with Tracker.start(cfg) as tracker:
        closed = tracker.close_earlier_parents(cfg["output_dir"])
    run = MlflowClient(earlier.tracking_uri).get_run(earlier.run_id)
    assert closed == [earlier.run_id]
    assert run.info.status == "KILLED"
    assert run.data.tags["replaced_by"] == tracker.run_id
