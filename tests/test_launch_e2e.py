"""End-to-end launches: the default (digits) and CIFAR-10 smoke, checked through MLflow."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPOSITORY = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

LAUNCHER = REPOSITORY / "runner" / "launch.py"


def run_launch(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def launch_runs(outputs: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def check_launch(outputs: Path, experiment: str) -> None:
    client, parents, children = launch_runs(outputs, experiment)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert not [r.info.run_id for r in parents + children if r.info.status == "RUNNING"]

    for stage in ("search", "retrain"):
        finished = [
            c for c in children if c.data.tags.get("stage") == stage and c.info.status == "FINISHED"
        ]
        assert len(finished) >= 2, f"{stage}: {len(finished)} finished child runs"
        for run in finished:
            assert "fid" in run.data.metrics, f"{stage} run {run.info.run_id} has no FID"
            assert "seed" in run.data.tags
            genotypes = [a.path for a in client.list_artifacts(run.info.run_id, "genotypes")]
            assert genotypes, f"{stage} run {run.info.run_id} has no genotype artifact"

    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.md"} <= parent_artifacts

    (output_dir,) = (outputs / experiment).iterdir()
    with (output_dir / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 2
    fids = [float(row["fid"]) for row in rows]
    assert fids == sorted(fids)
    assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
    retrain_ids = {c.info.run_id for c in children if c.data.tags.get("stage") == "retrain"}
    assert {row["mlflow_run_id"] for row in rows} <= retrain_ids
    assert (output_dir / "config.yaml").is_file()
    assert list((output_dir / "genotypes").glob("*-generator.json"))


def test_default_launch(tmp_path):
    result = run_launch(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| rank |" in result.stdout
    check_launch(tmp_path / "outputs", "digits")


def test_cifar10_smoke_launch(tmp_path, cifar10_root, anas_cache_dir):
    result = run_launch(
        tmp_path,
        "exp=cifar10",
        "budget=smoke",
        f"data.root={cifar10_root}",
        f"cache_dir={anas_cache_dir}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    check_launch(tmp_path / "outputs", "cifar10")
