import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from anas.errors import ConfigError
from anas.search import Search, SearchSettings
from anas.svg import write_cells_svg
from runner import tracking, trials
from runner.config import compose
from runner.tracking import (
    NONFINITE_TAG,
    Tracker,
    TrialRun,
    close_running_children,
    flatten_params,
    resolve_tracking_uri,
)

REPO = Path(__file__).resolve().parent.parent
PARENT_TAG = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One output_root, and so one SQLite store, shared by this module's tests."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture
def cfg(store, tmp_path, request, monkeypatch) -> dict:
    """A composed config writing to `store`, with an experiment named after the test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    name = request.node.name.replace("[", "_").replace("]", "")
    return compose(
        [f"output_root={store}", f"output_dir={tmp_path}/run", f"mlflow.experiment={name}"],
        base_dir=tmp_path,
    )


def free_port() -> int:
    """Return a loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_for(tracker: Tracker) -> MlflowClient:
    return MlflowClient(tracking_uri=tracker.tracking_uri)


def open_trial(tracker: Tracker, name: str = "trial_0", **tags) -> TrialRun:
    return TrialRun.open(tracker.handle, "search", name, f"id-{name}", tags=tags)


# Tracking URI


def test_uri_from_config_first(tmp_path):
    cfg = compose([f"mlflow.tracking_uri=sqlite:///{tmp_path}/a.db"], base_dir=tmp_path)
    environ = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/b.db"}
    assert resolve_tracking_uri(cfg, environ) == f"sqlite:///{tmp_path}/a.db"


def test_uri_from_environment_second(tmp_path):
    cfg = compose([], base_dir=tmp_path)
    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    assert resolve_tracking_uri(cfg, environ) == "http://127.0.0.1:5000"


def test_relative_environment_uri_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose([], base_dir=tmp_path)
    environ = {"MLFLOW_TRACKING_URI": "sqlite:///rel/m.db"}
    assert resolve_tracking_uri(cfg, environ) == f"sqlite:///{tmp_path}/rel/m.db"


def test_uri_default_in_output_root(tmp_path):
    cfg = compose([], base_dir=tmp_path)
    assert resolve_tracking_uri(cfg, {}) == f"sqlite:///{tmp_path}/outputs/mlflow.db"


# Experiment and runs


def test_experiment_has_fid_primary_metric(cfg):
    with Tracker.start(cfg) as tracker:
        experiment = client_for(tracker).get_experiment(tracker.experiment_id)
    assert experiment.name == cfg["mlflow"]["experiment"]
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "fid"
    assert experiment.tags["mlflow.experiment.primaryMetric.greaterIsBetter"] == "False"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_experiment_reused_by_second_launch(cfg):
    with Tracker.start(cfg) as first:
        pass
    cfg["output_dir"] += "-second"
    with Tracker.start(cfg) as second:
        pass
    assert second.experiment_id == first.experiment_id
    assert second.run_id != first.run_id


def test_store_in_output_root(cfg, store):
    with Tracker.start(cfg) as tracker:
        assert tracker.tracking_uri == f"sqlite:///{store}/mlflow.db"
    assert (store / "mlflow.db").is_file()


def test_no_mlruns_in_working_directory(cfg, tmp_path, store):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.log_dict({"a": 1}, "genotypes/generator.json")
        run.end()
        tracker.log_artifact(__file__)
    assert not (tmp_path / "mlruns").exists()
    experiment = client_for(tracker).get_experiment(tracker.experiment_id)
    assert experiment.artifact_location.startswith((store / "mlartifacts").as_uri())


def test_parent_params_flattened(cfg):
    with Tracker.start(cfg) as tracker:
        pass
    params = client_for(tracker).get_run(tracker.run_id).data.params
    assert params["search.g_lr"] == "0.0002"
    assert params["search.seeds"] == str(cfg["search"]["seeds"])
    assert params["search.space.g_lr.type"] == "loguniform"
    assert params["exp_name"] == "digits"


def test_flatten_skips_genotypes_and_long_values():
    flat = flatten_params(
        {"a": {"b": 1, "genotype": {"cells": [1, 2]}}, "long": "x" * 300, "genotypes": [1]}
    )
    assert flat == {"a.b": "1"}


def test_child_run_nested(cfg):
    with Tracker.start(cfg) as tracker:
        run = TrialRun.open(
            tracker.handle,
            "retrain",
            "retrain_trial_3",
            "abc123",
            tags={"seed": 3, "genotype_hash": "0123456789ab"},
            params={"seed": 3, "candidate": "searched-x"},
        )
        run.end("FINISHED")
    child = client_for(tracker).get_run(run.run_id)
    assert child.data.tags[PARENT_TAG] == tracker.run_id
    assert child.data.tags["stage"] == "retrain"
    assert child.data.tags["seed"] == "3"
    assert child.data.tags["genotype_hash"] == "0123456789ab"
    assert child.data.tags["trial_id"] == "abc123"
    assert child.info.run_name == "retrain_trial_3"
    assert child.info.experiment_id == tracker.experiment_id
    assert child.data.params == {"seed": "3", "candidate": "searched-x"}
    assert child.info.status == "FINISHED"


def test_metrics_logged_by_step(cfg):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        for step in (1, 2, 3):
            run.log_metrics({"g_loss": step / 10, "done": True, "note": "x"}, step)
        run.end()
    history = client_for(tracker).get_metric_history(run.run_id, "g_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert set(client_for(tracker).get_run(run.run_id).data.metrics) == {"g_loss"}


def test_queued_metrics_sent_by_flush(cfg):
    with Tracker.start(cfg) as tracker:
        client = client_for(tracker)
        run = open_trial(tracker)
        for step in (1, 2, 3):
            run.queue_metrics({"g_loss": step / 10, "d_loss": step / 5}, step)
        before = client.get_metric_history(run.run_id, "g_loss")
        run.flush_metrics()
        after = client.get_metric_history(run.run_id, "g_loss")
        run.end()
    assert before == []
    assert [(m.step, m.value) for m in after] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_queued_metrics_sent_by_end(cfg):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.queue_metrics({"g_loss": 0.5}, 4)
        run.queue_metrics({"g_loss": float("nan"), "d_loss": 0.25}, 5)
        run.end("FAILED")
    client = client_for(tracker)
    history = client.get_metric_history(run.run_id, "g_loss")
    assert [(m.step, m.value) for m in history] == [(4, 0.5)]
    assert [m.step for m in client.get_metric_history(run.run_id, "d_loss")] == [5]
    assert client.get_run(run.run_id).data.tags[NONFINITE_TAG] == "g_loss"


def test_queued_metrics_sent_after_interval(cfg, monkeypatch):
    monkeypatch.setattr(tracking, "METRIC_FLUSH_S", 0.0)
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.queue_metrics({"g_loss": 0.5}, 1)
        history = client_for(tracker).get_metric_history(run.run_id, "g_loss")
        run.end()
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_diagram_drawn_once_per_genotype(cfg, tmp_path, monkeypatch):
    g, d = Search(SearchSettings.from_config(cfg), "cpu", 0).genotypes()
    drawn = []

    def draw(genotype, path):
        drawn.append(genotype.hash)
        return write_cells_svg(genotype, path)

    monkeypatch.setattr(trials, "write_cells_svg", draw)
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        diagrams = trials.DiagramLog(run, tmp_path / "drawn")
        diagrams.log((g,), "step000010")
        diagrams.log((g, d), "step000020")
        diagrams.log((g, d), "final")
        run.end()
    assert drawn == [g.hash, d.hash]
    client = client_for(tracker)
    expected = ["discriminator.svg", "generator.svg"]
    for name in ("step000020", "final"):
        artifacts = client.list_artifacts(run.run_id, f"diagrams/{name}")
        assert sorted(Path(a.path).name for a in artifacts) == expected, name


@pytest.mark.parametrize(
    ("interval", "times", "expected"),
    [
        (30.0, [0.0, 10.0, 29.0, 31.0, 40.0, 45.0], [True, False, False, True, False, True]),
        (0.0, [0.0, 0.0, 1.0, 2.0], [True, True, True, True]),
    ],
    ids=["every_30_s", "every_report"],
)
def test_checkpoint_schedule(monkeypatch, interval, times, expected):
    """The first report and the last (at 45 s) carry a checkpoint, others once per interval."""
    schedule = trials.CheckpointSchedule(interval)
    clock = iter(times)
    monkeypatch.setattr(trials.time, "monotonic", lambda: next(clock))
    final = [False] * (len(times) - 1) + [True]
    assert [schedule.due(last) for last in final] == expected


def test_nonfinite_metrics_skipped_and_tagged(cfg):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.log_metrics({"fid": float("nan"), "d_loss": 0.5}, 1)
        run.log_metrics({"g_loss": float("inf"), "d_loss": 0.4}, 2)
        run.end()
    data = client_for(tracker).get_run(run.run_id).data
    assert set(data.metrics) == {"d_loss"}
    assert data.tags[NONFINITE_TAG] == "fid,g_loss"


def test_image_logged_with_step(cfg, tmp_path):
    path = tmp_path / "grid.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.log_image(path, "samples", 7)
        run.end()
    files = client_for(tracker).list_artifacts(run.run_id, "images")
    names = [Path(f.path).name for f in files]
    assert any(name.startswith("samples+step+7+") and name.endswith(".png") for name in names)


def test_leaderboard_on_parent(cfg, tmp_path):
    csv = tmp_path / "leaderboard.csv"
    csv.write_text("rank,fid\n1,12.5\n")
    rows = [{"rank": 1, "fid": 12.5, "genotype": "a"}, {"rank": 2, "fid": 20.0, "genotype": "b"}]
    with Tracker.start(cfg) as tracker:
        tracker.log_leaderboard(rows, [csv])
    client = client_for(tracker)
    names = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"leaderboard.json", "leaderboard.csv"} <= names
    assert client.get_run(tracker.run_id).data.metrics["fid"] == 12.5


# Every run ends FINISHED, FAILED or KILLED


def test_runs_finished(cfg):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.end()
    client = client_for(tracker)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_runs_killed_after_keyboard_interrupt(cfg):
    with pytest.raises(KeyboardInterrupt), Tracker.start(cfg) as tracker:
        running = open_trial(tracker, "trial_0")
        finished = open_trial(tracker, "trial_1")
        finished.end("FINISHED")
        raise KeyboardInterrupt
    client = client_for(tracker)
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    assert client.get_run(running.run_id).info.status == "KILLED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"


def test_trial_context_maps_interrupt(cfg):
    with Tracker.start(cfg) as tracker:
        with pytest.raises(KeyboardInterrupt), open_trial(tracker, "a") as interrupted:
            raise KeyboardInterrupt
        with pytest.raises(ValueError), open_trial(tracker, "b") as crashed:
            raise ValueError("bad batch")
        with open_trial(tracker, "c") as finished:
            finished.log_metrics({"fid": 1.0}, 1)
    client = client_for(tracker)
    assert client.get_run(interrupted.run_id).info.status == "KILLED"
    assert client.get_run(crashed.run_id).info.status == "FAILED"
    assert client.get_run(finished.run_id).info.status == "FINISHED"


def test_runs_failed_after_exception(cfg):
    with pytest.raises(RuntimeError), Tracker.start(cfg) as tracker:
        running = open_trial(tracker)
        raise RuntimeError("stage crashed")
    client = client_for(tracker)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(running.run_id).info.status == "FAILED"


def test_close_running_children(cfg):
    with Tracker.start(cfg) as tracker:
        first, second = open_trial(tracker, "a"), open_trial(tracker, "b")
        closed = close_running_children(tracker.tracking_uri, tracker.run_id, "KILLED")
        assert sorted(closed) == sorted([first.run_id, second.run_id])
        assert close_running_children(tracker.tracking_uri, tracker.run_id) == []
    assert client_for(tracker).get_run(first.run_id).info.status == "KILLED"


def test_reopened_run_returns_to_running(cfg):
    with Tracker.start(cfg) as tracker:
        run = open_trial(tracker)
        run.end("FAILED")
        again = TrialRun.open(tracker.handle, "search", "trial_0", "id", run_id=run.run_id)
        assert client_for(tracker).get_run(run.run_id).info.status == "RUNNING"
        again.log_metrics({"fid": 3.0}, 5)
        again.end()
    assert again.run_id == run.run_id
    assert client_for(tracker).get_run(run.run_id).info.status == "FINISHED"


# An unavailable store


def test_unreachable_server_fails_fast(cfg):
    cfg["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^mlflow\.tracking_uri: .*unreachable"):
        Tracker.start(cfg)
    assert time.monotonic() - started < cfg["mlflow"]["request_timeout_s"] + 5


def test_launcher_unreachable_server_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "runner" / "launch.py"),
            f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: mlflow.tracking_uri: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "outputs").exists()


def test_trial_survives_dead_server(caplog):
    handle = {
        "tracking_uri": f"http://127.0.0.1:{free_port()}",
        "experiment_id": "1",
        "parent_run_id": "0" * 32,
        "max_retries": 1,
        "request_timeout_s": 2,
        "primary_metric": "fid",
    }
    caplog.set_level(logging.WARNING, logger="runner.tracking")
    run = TrialRun.open(handle, "search", "trial_0", "id", params={"seed": 0})
    for step in range(5):
        run.log_metrics({"g_loss": 1.0, "d_loss": 2.0}, step)
    undelivered = run.end("FINISHED")
    assert run.run_id is None
    assert undelivered["metrics"] == 10
    assert undelivered["params"] == 1
    assert any("could not log 10 metrics" in r.getMessage() for r in caplog.records)


def test_buffered_metrics_delivered_later(cfg, store):
    with Tracker.start(cfg) as tracker:
        client = client_for(tracker)
        run = open_trial(tracker)
        run.handle["max_retries"] = 0
        # Another connection holding an exclusive lock makes every write of MLflow fail.
        blocker = sqlite3.connect(store / "mlflow.db", timeout=1)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            run.log_metrics({"fid": 9.0}, 1)
            run.log_metrics({"fid": 8.0}, 2)
        finally:
            blocker.rollback()
            blocker.close()
        assert client.get_metric_history(run.run_id, "fid") == []
        undelivered = run.end()
    assert undelivered == {}
    history = client.get_metric_history(run.run_id, "fid")
    assert [(m.step, m.value) for m in history] == [(1, 9.0), (2, 8.0)]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_queued_metrics_survive_dead_server(caplog):
    handle = {
        "tracking_uri": f"http://127.0.0.1:{free_port()}",
        "experiment_id": "1",
        "parent_run_id": "0" * 32,
        "max_retries": 1,
        "request_timeout_s": 2,
        "primary_metric": "fid",
    }
    caplog.set_level(logging.WARNING, logger="runner.tracking")
    run = TrialRun.open(handle, "search", "trial_0", "id")
    for step in range(5):
        run.queue_metrics({"g_loss": 1.0, "d_loss": 2.0}, step)
    undelivered = run.end("FINISHED")
    assert undelivered["metrics"] == 10
    assert any("could not log 10 metrics" in r.getMessage() for r in caplog.records)


def test_queued_metrics_buffered_while_locked(cfg, store):
    with Tracker.start(cfg) as tracker:
        client = client_for(tracker)
        run = open_trial(tracker)
        run.handle["max_retries"] = 0
        blocker = sqlite3.connect(store / "mlflow.db", timeout=1)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            run.queue_metrics({"g_loss": 0.5}, 1)
            run.queue_metrics({"g_loss": 0.4}, 2)
            run.flush_metrics()
        finally:
            blocker.rollback()
            blocker.close()
        undelivered = run.end()
    assert undelivered == {}
    history = client.get_metric_history(run.run_id, "g_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4)]
