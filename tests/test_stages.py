"""The hand-off between the stages and the leaderboard, on hand-made trial results."""

import json
from pathlib import Path

import pytest
import ray

from anas.errors import ConfigError
from anas.genotypes import genotype_from_dict, load_genotype, load_shipped
from anas.search import Search, SearchSettings
from runner import cluster, stages
from runner.config import compose
from runner.stages import build_leaderboard, run_search_stage, select_candidates, write_candidates
from runner.tracking import Tracker, resolve_tracking_uri

TINY = ["model.latent_dim=12", "model.g_channels=4", "model.d_channels=4"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    base = tmp_path_factory.mktemp("stages")
    return compose(["exp=digits", "budget=smoke", *TINY], base_dir=base)


@pytest.fixture(scope="module")
def genotype_pairs(cfg):
    """Two different (generator, discriminator) genotype pairs from searches of two seeds."""
    settings = SearchSettings.from_config(cfg)
    pairs = [Search(settings, "cpu", seed).genotypes() for seed in (0, 1)]
    assert pairs[0][0].hash != pairs[1][0].hash
    return pairs


def search_row(pair, seed: int, fid: float, failure=None) -> dict:
    g, d = pair
    return {
        "config": {"seed": seed},
        "metrics": {
            "fid": fid,
            "genotype_generator": json.dumps(g.to_dict()),
            "genotype_discriminator": json.dumps(d.to_dict()),
            "device_seconds": 3600.0,
            "device": "cpu",
        },
        "failure": failure,
    }


def with_retrain(cfg, **values):
    return {**cfg, "retrain": {**cfg["retrain"], **values}}


def test_candidates_ranked_by_search_fid(cfg, genotype_pairs):
    rows = [search_row(genotype_pairs[0], 0, 50.0), search_row(genotype_pairs[1], 1, 20.0)]
    candidates = select_candidates(with_retrain(cfg, top_k=2, baselines=[]), rows)
    assert [c["search_fid"] for c in candidates] == [20.0, 50.0]
    assert candidates[0]["search_seeds"] == [1]


def test_identical_genotypes_merge_keeping_seeds(cfg, genotype_pairs):
    rows = [
        search_row(genotype_pairs[0], 0, 30.0),
        search_row(genotype_pairs[0], 1, 10.0),
        search_row(genotype_pairs[1], 2, 20.0),
    ]
    candidates = select_candidates(with_retrain(cfg, top_k=2, baselines=[]), rows)
    assert len(candidates) == 2
    assert sorted(candidates[0]["search_seeds"]) == [0, 1]
    assert candidates[0]["search_fid"] == 10.0
    assert candidates[0]["search_device_seconds"] == 7200.0


def test_failed_search_trials_are_not_candidates(cfg, genotype_pairs):
    rows = [
        search_row(genotype_pairs[0], 0, 1.0, failure="non-finite: g_loss is nan"),
        search_row(genotype_pairs[1], 1, 20.0),
    ]
    candidates = select_candidates(with_retrain(cfg, top_k=1, baselines=[]), rows)
    assert candidates[0]["search_seeds"] == [1]


def test_top_k_beyond_distinct_genotypes_rejected(cfg, genotype_pairs):
    rows = [search_row(genotype_pairs[0], 0, 30.0), search_row(genotype_pairs[0], 1, 10.0)]
    with pytest.raises(ConfigError, match="retrain.top_k"):
        select_candidates(with_retrain(cfg, top_k=2, baselines=[]), rows)


def test_baseline_added_to_candidates(cfg, genotype_pairs):
    rows = [search_row(genotype_pairs[0], 0, 30.0)]
    candidates = select_candidates(
        with_retrain(cfg, top_k=1, baselines=["adversarialnas-cifar10"]), rows
    )
    assert len(candidates) == 2
    published = load_shipped("adversarialnas-cifar10")
    assert candidates[1]["generator"]["cells"] == published.to_dict()["cells"]
    assert candidates[1]["discriminator"] is None


def test_transfer_from_earlier_output_dir(cfg, genotype_pairs, tmp_path):
    earlier = {**cfg, "output_dir": str(tmp_path / "earlier")}
    rows = [search_row(genotype_pairs[0], 0, 30.0), search_row(genotype_pairs[1], 1, 10.0)]
    write_candidates(earlier, select_candidates(with_retrain(earlier, top_k=2), rows))

    later = with_retrain(cfg, genotypes=[earlier["output_dir"]], baselines=[])
    candidates = select_candidates(later, [])
    hashes = {genotype_from_dict(c["generator"]).hash for c in candidates}
    assert hashes == {genotype_pairs[0][0].hash, genotype_pairs[1][0].hash}
    assert all(c["discriminator"] is not None for c in candidates)


def test_transfer_from_genotype_file(cfg, tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(load_shipped("adversarialnas-cifar10").to_dict()))
    candidates = select_candidates(with_retrain(cfg, genotypes=[str(path)], baselines=[]), [])
    assert len(candidates) == 1
    assert load_genotype(path).to_dict()["cells"] == candidates[0]["generator"]["cells"]


def retrain_row(candidate: int, seed: int, fid: float, failure=None) -> dict:
    protocol = {"tag": "classifier-digits-train-r1000-g1000-16px"}
    return {
        "config": {"candidate": candidate, "seed": seed},
        "metrics": {
            "fid": fid,
            "is": 2.0,
            "kid": 0.1,
            "protocol": json.dumps(protocol),
            "device_seconds": 1800.0,
            "device": "cpu",
            "generator_parameters": 1234,
            "mlflow_run_id": f"run-{candidate}-{seed}",
        },
        "failure": failure,
    }


def test_leaderboard_sorted_by_fid_without_failures(cfg, genotype_pairs):
    rows = [search_row(genotype_pairs[0], 0, 30.0), search_row(genotype_pairs[1], 1, 10.0)]
    candidates = select_candidates(with_retrain(cfg, top_k=2, baselines=[]), rows)
    resources = {"cpu": 2, "gpu": 0}
    board = build_leaderboard(
        cfg,
        candidates,
        [
            retrain_row(0, 0, 40.0),
            retrain_row(1, 0, 15.0),
            retrain_row(0, 1, 25.0),
            retrain_row(1, 1, 5.0, failure="non-finite: fid is nan"),
        ],
        resources,
    )
    assert [row["fid"] for row in board] == [15.0, 25.0, 40.0]
    assert [row["rank"] for row in board] == [1, 2, 3]
    assert board[0]["retrain_device_hours"] == pytest.approx(1.0)  # 0.5 h on 2 CPUs
    assert board[0]["search_device_hours"] == pytest.approx(2.0)
    assert board[0]["mlflow_run_id"] == "run-1-0"


# ---------------------------------------------------------------------------------------------
# A search trial that runs in the Ray worker of an earlier trial (Tune's reuse_actors).


def search_results(cfg: dict, name: str, tracking: dict) -> dict[int, dict]:
    """Run a search stage in output_dir/<name>; return each seed's last reported metrics."""
    cfg = {**cfg, "output_dir": str(Path(cfg["output_dir"]) / name)}
    rows = run_search_stage(cfg, tracking, {"cpu": 1, "gpu": 0})
    assert [row["failure"] for row in rows] == [None, None]
    return {int(row["config"]["seed"]): row["metrics"] for row in rows}


@pytest.mark.slow
def test_reused_worker_repeats_results(tmp_path, anas_cache_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = [
        "search.seeds=[0,1]",
        "search.iterations=2",
        "search.eval_every=1",
        "metrics.search_n_generated=64",
        "tune.max_concurrent=1",
    ]
    cfg = compose(
        [*TINY, *small, f"cache_dir={anas_cache_dir}", f"output_root={tmp_path}"],
        base_dir=tmp_path,
    )
    uri = resolve_tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cluster.connect(cfg, uri)
    try:
        with Tracker.start(cfg) as tracker:
            reused = search_results(cfg, "reused", dict(tracker.handle))
            monkeypatch.setattr(stages, "REUSE_ACTORS", False)
            fresh = search_results(cfg, "fresh", dict(tracker.handle))
    finally:
        ray.shutdown()
    assert reused[0]["pid"] == reused[1]["pid"]
    assert fresh[0]["pid"] != fresh[1]["pid"]
    for seed in (0, 1):
        assert reused[seed]["fid"] == fresh[seed]["fid"], seed
        assert reused[seed]["genotype_generator"] == fresh[seed]["genotype_generator"], seed
        assert reused[seed]["d_loss"] == fresh[seed]["d_loss"], seed
