"""Bad input stops the launcher with exit status 2 and one line naming the key, file or value.

Cases rejected before Ray starts run `runner.launch.main` in this process; cases that need Ray
(resources, resumed trials) run the launcher as a subprocess. Every case also checks that no
MLflow run is left RUNNING and that no temporary file is left behind.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from anas.genotypes import SHIPPED, load_shipped
from runner import launch
from runner.config import HANDOFF_FILE, compose, resumed_config, save_config

REPOSITORY = Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / "runner" / "launch.py"

# The smoke budget cut to two evaluations per trial.
SMALL = [
    "search.iterations=4",
    "search.eval_every=2",
    "retrain.iterations=4",
    "retrain.eval_every=2",
    "metrics.search_n_generated=64",
]


# ---------------------------------------------------------------------------------------------
# Files the cases point at.


def write_images(folder: Path, sizes_and_modes: list[tuple[int, str]]) -> None:
    """Write PNGs into two class folders, alternating between them."""
    rng = np.random.default_rng(0)
    for index, (size, mode) in enumerate(sizes_and_modes):
        class_dir = folder / "train" / f"class{index % 2}"
        class_dir.mkdir(parents=True, exist_ok=True)
        shape = (size, size) if mode == "L" else (size, size, 3)
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode).save(class_dir / f"{index:03d}.png")


def empty_folder(tmp: Path) -> None:
    (tmp / "images" / "train" / "class0").mkdir(parents=True)


def mixed_sizes(tmp: Path) -> None:
    write_images(tmp / "images", [(16, "L")] * 3 + [(20, "L")])


def mixed_channels(tmp: Path) -> None:
    write_images(tmp / "images", [(16, "L")] * 3 + [(16, "RGB")])


def grey_images(tmp: Path) -> None:
    write_images(tmp / "images", [(32, "L")] * 4)


def genotype_dict() -> dict:
    return load_shipped(sorted(SHIPPED)[0]).to_dict()


def write_genotype(tmp: Path, genotype: dict) -> None:
    (tmp / "bad-generator.json").write_text(json.dumps(genotype))


def unknown_operation(tmp: Path) -> None:
    genotype = genotype_dict()
    edge = next(iter(genotype["cells"][0]))
    genotype["cells"][0][edge] = "conv_9x9"
    write_genotype(tmp, genotype)


def missing_edge(tmp: Path) -> None:
    genotype = genotype_dict()
    del genotype["cells"][0][next(iter(genotype["cells"][0]))]
    write_genotype(tmp, genotype)


def wrong_cell_count(tmp: Path) -> None:
    genotype = genotype_dict()
    genotype["cells"] = genotype["cells"][:-1]
    write_genotype(tmp, genotype)


def regular_file(tmp: Path) -> None:
    (tmp / "file").write_text("")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Checks shared by every case.


def running_runs(tmp: Path) -> set[str]:
    store = tmp / "outputs" / "mlflow.db"
    if not store.exists():
        return set()
    client = MlflowClient(f"sqlite:///{store}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=1000) if experiments else []
    return {run.info.run_id for run in runs if run.info.status == "RUNNING"}


def temporary_files(tmp: Path) -> list[Path]:
    return [p for p in tmp.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def check_rejected(status: int, stderr: str, start: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"error: {start}"), errors[0]
    assert "Traceback" not in stderr


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
    """Run runner.launch.main in tmp_path; return (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sigterm = signal.getsignal(signal.SIGTERM)

    def run(*overrides: str) -> tuple[int, str]:
        status = launch.main(list(overrides))
        return status, capsys.readouterr().err

    yield run
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    signal.signal(signal.SIGTERM, sigterm)


def run_launcher(cwd: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------
# Rejected before Ray starts: config, data, genotypes, tracking store, output_dir.

CASES = {
    "unknown_experiment": (["exp=nope"], None, "exp: no config named 'nope'"),
    "unknown_budget": (["budget=nope"], None, "budget: no config named 'nope'"),
    "unknown_key": (["search.nope=1"], None, "search.nope: unknown key"),
    "wrong_type": (["search.iterations=abc"], None, "search.iterations: expected a positive"),
    "negative_lr": (["search.g_lr=-1"], None, "search.g_lr: expected a positive float"),
    "zero_lr": (["retrain.d_lr=0"], None, "retrain.d_lr: expected a positive float"),
    "image_size": (["data.img_size=20"], None, "data.img_size: expected a multiple of 8"),
    "top_k_zero": (["retrain.top_k=0"], None, "retrain.top_k: expected a positive integer"),
    "top_k_above_genotypes": (["retrain.top_k=3"], None, "retrain.top_k: 3 is larger than"),
    "empty_search_seeds": (["search.seeds=[]"], None, "search.seeds: expected a non-empty"),
    "empty_retrain_seeds": (["retrain.seeds=[]"], None, "retrain.seeds: expected a non-empty"),
    "negative_failures": (["tune.max_failures=-2"], None, "tune.max_failures: expected"),
    "missing_dataset": (
        ["exp=cifar10", "data.root={tmp}/nowhere"],
        None,
        "data.root: {tmp}/nowhere not found",
    ),
    "empty_image_folder": (
        ["data.name=image_folder", "data.root={tmp}/images"],
        empty_folder,
        "data.root: no images found",
    ),
    "mixed_image_sizes": (
        ["data.name=image_folder", "data.root={tmp}/images"],
        mixed_sizes,
        "data.root: image ",
    ),
    "mixed_channel_counts": (
        ["data.name=image_folder", "data.root={tmp}/images"],
        mixed_channels,
        "data.root: image ",
    ),
    "grey_folder_rgb_experiment": (
        ["exp=cifar10", "data.name=image_folder", "data.root={tmp}/images"],
        grey_images,
        "data.channels: images in the folder have 1 channel",
    ),
    "grey_dataset_rgb_channels": (["data.channels=3"], None, "data.channels: dataset 'digits'"),
    "too_few_generated": (["metrics.n_generated=999"], None, "metrics.n_generated: expected"),
    "too_few_real": (["metrics.n_real=5000"], None, "metrics.n_real: 5000 real images"),
    "missing_genotype": (
        ["retrain.genotypes=[{tmp}/missing.json]"],
        None,
        "retrain.genotypes[0]: {tmp}/missing.json not found",
    ),
    "genotype_unknown_operation": (
        ["retrain.genotypes=[{tmp}/bad-generator.json]"],
        unknown_operation,
        "retrain.genotypes[0]: {tmp}/bad-generator.json: field 'cells[0].",
    ),
    "genotype_missing_edge": (
        ["retrain.genotypes=[{tmp}/bad-generator.json]"],
        missing_edge,
        "retrain.genotypes[0]: {tmp}/bad-generator.json: field 'cells[0].",
    ),
    "genotype_cell_count": (
        ["retrain.genotypes=[{tmp}/bad-generator.json]"],
        wrong_cell_count,
        "retrain.genotypes[0]: {tmp}/bad-generator.json: field 'cells'",
    ),
    "unreachable_tracking_server": (
        ["mlflow.tracking_uri=http://127.0.0.1:{port}", "mlflow.request_timeout_s=2"],
        None,
        "mlflow.tracking_uri: the tracking server",
    ),
    "output_dir_under_file": (["output_dir={tmp}/file/run"], regular_file, "output_dir: "),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_before_ray(case, tmp_path, in_process):
    overrides, setup, start = CASES[case]
    if setup:
        setup(tmp_path)
    names = {"tmp": tmp_path, "port": free_port()}
    overrides = [item.format(**names) for item in overrides]
    if not any(item.startswith("output_dir=") for item in overrides):
        overrides.append(f"output_dir={tmp_path}/run")
    status, stderr = in_process(*overrides)
    check_rejected(status, stderr, start.format(**names))
    assert not (tmp_path / "run").exists()
    assert running_runs(tmp_path) == set()
    assert temporary_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Rejected once Ray is up: per-trial resources that no node of the cluster has.


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["resources.gpu=64", "resources.cpu_fallback=false"], "resources.gpu: each trial"),
        (["resources.cpu=4096"], "resources.cpu: each trial requests 4096 CPUs"),
    ],
    ids=["gpu_beyond_cluster", "cpu_beyond_cluster"],
)
def test_rejected_resources(tmp_path, overrides, start):
    result = run_launcher(tmp_path, f"output_dir={tmp_path}/run", *overrides)
    check_rejected(result.returncode, result.stderr, start)
    assert not (tmp_path / "run").exists()
    assert running_runs(tmp_path) == set()


# ---------------------------------------------------------------------------------------------
# Resuming a launch killed after its first checkpoint.


class RunsCode:
    """Pickles to a call of open(path, "w"): loading it with full unpickling creates the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, anas_cache_dir):
    """A launch SIGKILLed after its first search checkpoint, saved as a tar for each test."""
    cwd = tmp_path_factory.mktemp("interrupted")
    output_dir = cwd / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    # Long enough that the trials are still running when Tune has recorded a checkpoint.
    overrides = [*SMALL, "search.iterations=20", f"cache_dir={anas_cache_dir}"]
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), f"output_dir={output_dir}", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_recorded_checkpoint(output_dir / "search", process)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and every Ray process it started
    process.wait(timeout=60)
    time.sleep(5)  # trial workers end with their raylet
    archive = shutil.make_archive(str(cwd / "snapshot"), "tar", cwd, ".")
    return cwd, Path(archive)


@pytest.fixture
def resumable(interrupted):
    """The interrupted launch unpacked afresh at its original path; return its folder."""
    cwd, archive = interrupted
    for entry in cwd.iterdir():
        if entry != archive:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.unpack_archive(archive, cwd, "tar")
    return cwd


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


def checkpoints(cwd: Path) -> list[Path]:
    return list((cwd / "run").glob("search/*/checkpoint_*/state.pt"))


def truncate(cwd: Path) -> None:
    for path in checkpoints(cwd):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def plant_code(cwd: Path) -> None:
    for path in checkpoints(cwd):
        torch.save({"search": RunsCode(cwd / "marker")}, path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "start"),
    [(truncate, "checkpoint "), (plant_code, "checkpoint ")],
    ids=["truncated_checkpoint", "pickled_code_checkpoint"],
)
def test_resume_rejects_checkpoint(resumable, corrupt, start):
    corrupt(resumable)
    result = run_launcher(resumable, f"output_dir={resumable / 'run'}", "resume=true")
    check_rejected(result.returncode, result.stderr, start)
    assert "state.pt" in result.stderr.splitlines()[-1]
    assert not (resumable / "marker").exists()
    assert running_runs(resumable) == set()
    assert temporary_files(resumable / "run") == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "start"),
    [("search.g_lr=1e-3", "search.g_lr: a resumed launch keeps"), ("exp=cifar10", "exp: ")],
    ids=["changed_learning_rate", "changed_experiment"],
)
def test_resume_rejects_changed_config(resumable, override, start):
    before = running_runs(resumable)
    result = run_launcher(resumable, f"output_dir={resumable / 'run'}", "resume=true", override)
    check_rejected(result.returncode, result.stderr, start)
    assert running_runs(resumable) <= before


# ---------------------------------------------------------------------------------------------
# Which overrides a resumed launch accepts, checked on a saved config without running it.


@pytest.fixture
def saved_launch(tmp_path):
    """A config saved in tmp_path/run as a launch saves it; return the composed config."""
    cfg = compose([f"output_dir={tmp_path}/run", "tune.max_failures=2"], base_dir=tmp_path)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return cfg


def resume_with(tmp_path: Path, *overrides: str) -> dict:
    overrides = (f"output_dir={tmp_path}/run", "resume=true", *overrides)
    return resumed_config(compose(overrides, base_dir=tmp_path), overrides)


def test_resume_keeps_saved_values(tmp_path, saved_launch):
    cfg = resume_with(tmp_path)
    assert cfg["tune"]["max_failures"] == 2
    assert cfg["resume"] is True


def test_resume_fills_key_added_later(tmp_path, saved_launch):
    """A config saved before tune.checkpoint_interval_s existed resumes with the default."""
    path = tmp_path / "run" / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    del saved["tune"]["checkpoint_interval_s"]
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    cfg = resume_with(tmp_path)
    assert cfg["tune"]["checkpoint_interval_s"] == saved_launch["tune"]["checkpoint_interval_s"]
    assert cfg["tune"]["max_failures"] == 2


def test_resume_applies_retry_override(tmp_path, saved_launch):
    assert resume_with(tmp_path, "tune.max_failures=5")["tune"]["max_failures"] == 5


def test_resume_top_k_before_handoff(tmp_path, saved_launch):
    assert resume_with(tmp_path, "retrain.top_k=2")["retrain"]["top_k"] == 2


def test_resume_top_k_after_handoff(tmp_path, saved_launch):
    (tmp_path / "run" / HANDOFF_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"^retrain\.top_k: a resumed launch keeps"):
        resume_with(tmp_path, "retrain.top_k=2")
