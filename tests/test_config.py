import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anas.errors import ConfigError
from experiments import CONFIG_DIR
from runner.config import compose, load_config, save_config, validate

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "runner" / "launch.py"
EXPS = sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml"))
BUDGETS = sorted(p.stem for p in (CONFIG_DIR / "budget").glob("*.yaml"))


def compose_in(tmp_path: Path, *overrides: str) -> dict:
    return compose([f"output_root={tmp_path}/outputs", *overrides], base_dir=tmp_path)


def config_error(tmp_path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        compose_in(tmp_path, *overrides)
    return str(caught.value)


def run_launcher(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# Composition


def test_groups_present():
    assert EXPS == ["cifar10", "digits", "imagenette", "stl10"]
    assert BUDGETS == ["cpu", "paper", "smoke"]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("exp", EXPS)
def test_compose_each_exp_and_budget(tmp_path, exp, budget):
    cfg = compose_in(tmp_path, f"exp={exp}", f"budget={budget}")
    assert cfg["exp_name"] == exp
    assert cfg["budget_name"] == budget
    assert cfg["data"]["name"] == exp
    assert cfg["mlflow"]["experiment"] == exp


def test_default_is_digits_smoke(tmp_path):
    cfg = compose_in(tmp_path)
    assert cfg["exp_name"] == "digits"
    assert cfg["budget_name"] == "smoke"
    assert cfg["metrics"]["extractor"] == "classifier"


def test_config_defaults(tmp_path):
    cfg = compose_in(tmp_path)
    assert cfg["search"]["arch_lr"] == 3e-4
    assert cfg["search"]["arch_betas"] == [0.5, 0.999]
    assert cfg["search"]["arch_weight_decay"] == 1e-4
    assert cfg["search"]["g_lr"] == 2e-4
    assert cfg["search"]["betas"] == [0.0, 0.9]
    assert cfg["search"]["loss"] == "hinge"
    assert cfg["retrain"]["discriminator"] == "searched"


def test_paper_budget_settings(tmp_path):
    cfg = compose_in(tmp_path, "exp=cifar10", "budget=paper")
    assert cfg["search"]["batch_size"] == 120
    assert cfg["model"]["g_channels"] == 160
    assert cfg["model"]["d_channels"] == 80
    assert cfg["model"]["latent_dim"] == 120
    assert cfg["search"]["n_critic"] == 5
    assert cfg["search"]["gumbel"] is True
    assert cfg["search"]["tau_max"] == 5.0
    assert cfg["search"]["tau_min"] == 0.1
    assert cfg["retrain"]["g_channels"] == 256
    assert cfg["retrain"]["d_channels"] == 128
    assert cfg["retrain"]["gen_batch_size"] == 80
    assert cfg["retrain"]["batch_size"] == 40
    assert cfg["retrain"]["ema_decay"] == 0.999
    assert cfg["metrics"]["n_generated"] == 50000
    assert cfg["metrics"]["extractor"] == "inception-v3-compat"


def test_overrides_apply(tmp_path):
    cfg = compose_in(
        tmp_path, "search.g_lr=1e-4", "search.seeds=[0,1,2]", "resources.gpu=0.5", "exp=cifar10"
    )
    assert cfg["search"]["g_lr"] == 1e-4
    assert cfg["search"]["seeds"] == [0, 1, 2]
    assert cfg["resources"]["gpu"] == 0.5
    assert cfg["data"]["img_size"] == 32


def test_ints_widened_to_float(tmp_path):
    cfg = compose_in(tmp_path, "search.g_lr=1", "resources.cpu=2")
    assert isinstance(cfg["search"]["g_lr"], float)
    assert isinstance(cfg["resources"]["cpu"], float)


def test_new_space_range_added(tmp_path):
    cfg = compose_in(tmp_path, "+search.space.batch_size={type:choice,values:[8,16]}")
    assert cfg["search"]["space"]["batch_size"] == {"type": "choice", "values": [8, 16]}


def test_space_range_replaced(tmp_path):
    cfg = compose_in(
        tmp_path, "~search.space.n_critic", "+search.space.n_critic={type:int,low:1,high:3}"
    )
    assert cfg["search"]["space"]["n_critic"] == {"type": "int", "low": 1, "high": 3}


# Paths


def test_paths_absolute(tmp_path):
    cfg = compose([], base_dir=tmp_path)
    for key in ("output_root", "output_dir", "cache_dir"):
        assert Path(cfg[key]).is_absolute(), key
    assert cfg["output_root"] == str(tmp_path / "outputs")
    assert cfg["cache_dir"] == str(tmp_path / ".cache" / "anas")


def test_output_dir_default(tmp_path):
    cfg = compose_in(tmp_path, "exp=cifar10")
    output_dir = Path(cfg["output_dir"])
    assert output_dir.parent == tmp_path / "outputs" / "cifar10"
    assert len(output_dir.name) == len("2026-12-04_15-33-46")


def test_storage_path_defaults_to_output_dir(tmp_path):
    cfg = compose_in(tmp_path)
    assert cfg["storage"]["path"] == cfg["output_dir"]


def test_relative_paths_resolved(tmp_path):
    cfg = compose_in(tmp_path, "output_dir=runs/a", "data.root=data", "storage.path=ray")
    assert cfg["output_dir"] == str(tmp_path / "runs" / "a")
    assert cfg["data"]["root"] == str(tmp_path / "data")
    assert cfg["storage"]["path"] == str(tmp_path / "ray")


def test_storage_uri_kept(tmp_path):
    cfg = compose_in(tmp_path, "storage.path=s3://bucket/runs")
    assert cfg["storage"]["path"] == "s3://bucket/runs"


def test_relative_sqlite_uri_resolved(tmp_path):
    cfg = compose_in(tmp_path, "mlflow.tracking_uri=sqlite:///store/m.db")
    assert cfg["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path}/store/m.db"


def test_genotype_paths_resolved(tmp_path):
    (tmp_path / "g.json").write_text("{}")
    cfg = compose_in(tmp_path, "retrain.genotypes=[g.json]")
    assert cfg["retrain"]["genotypes"] == [str(tmp_path / "g.json")]


# Rejected input: each error is one line that starts with the key


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("search.g_lr=-1", "search.g_lr: expected a positive float, got -1"),
        ("search.g_lr=abc", "search.g_lr: expected a positive float, got 'abc'"),
        ("search.d_lr=0", "search.d_lr: expected a positive float"),
        ("search.arch_lr=inf", "search.arch_lr: expected a positive float"),
        ("retrain.g_lr=-2e-4", "retrain.g_lr: expected a positive float"),
        ("data.img_size=20", "data.img_size: expected a multiple of 8 that is at least 16"),
        ("data.img_size=8", "data.img_size: expected a multiple of 8 that is at least 16"),
        ("data.img_size=16.0", "data.img_size: expected a multiple of 8"),
        ("data.channels=2", "data.channels: expected 1 or 3"),
        ("search.seeds=[]", "search.seeds: expected a non-empty list of distinct integers"),
        ("search.seeds=[1,1]", "search.seeds: expected a non-empty list of distinct integers"),
        ("retrain.seeds=[a]", "retrain.seeds: expected a non-empty list of distinct integers"),
        ("retrain.top_k=0", "retrain.top_k: expected a positive integer, got 0"),
        ("search.n_critic=0", "search.n_critic: expected a positive integer"),
        ("resources.gpu=-0.5", "resources.gpu: expected a float >= 0"),
        ("resources.cpu=0", "resources.cpu: expected a positive float"),
        ("search.betas=[0.5]", "search.betas: expected a list of two floats in [0, 1)"),
        ("retrain.ema_decay=1", "retrain.ema_decay: expected a float in [0, 1)"),
        ("search.gumbel=maybe", "search.gumbel: expected true or false"),
        ("retrain.discriminator=other", "retrain.discriminator: expected searched or autogan"),
        ("tune.max_concurrent=0", "tune.max_concurrent: expected a positive integer or null"),
        ("tune.checkpoint_interval_s=-1", "tune.checkpoint_interval_s: expected a float >= 0"),
        ("data=1", "data: expected a mapping"),
        ("exp_name=a/b", "exp_name: expected a name"),
        ("search.tau_min=10", "search.tau_min: expected a float no larger than search.tau_max"),
    ],
)
def test_invalid_value_names_key(tmp_path, override, start):
    message = config_error(tmp_path, override)
    assert message.startswith(start)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["exp=nope"], "exp: no config named 'nope'"),
        (["budget=nope"], "budget: no config named 'nope'"),
        (["search.foo=1"], "search.foo: unknown key"),
        (["+search.foo=1"], "search.foo: unknown key"),
        (["foo=1"], "foo: unknown key"),
        (["search.g_lr"], "invalid override 'search.g_lr'"),
        (["~search.g_lr"], "search.g_lr: missing"),
        (["search.g_lr=${nowhere}"], "search.g_lr: "),
        (["search.space.n_critic={type:uniform,low:1,high:2}"], "search.space.n_critic.low:"),
    ],
)
def test_invalid_override_names_key(tmp_path, overrides, start):
    message = config_error(tmp_path, *overrides)
    assert message.startswith(start)
    assert "\n" not in message


def test_unknown_exp_lists_options(tmp_path):
    message = config_error(tmp_path, "exp=nope")
    assert "cifar10, digits, imagenette, stl10" in message


def test_missing_value_names_key(tmp_path):
    raw = compose_in(tmp_path)
    del raw["search"]["iterations"]
    with pytest.raises(ConfigError, match=r"^search\.iterations: missing"):
        validate(raw, tmp_path)


def test_unknown_yaml_key_rejected(tmp_path):
    raw = compose_in(tmp_path)
    raw["retrain"]["topk"] = 2
    with pytest.raises(ConfigError, match=r"^retrain\.topk: unknown key"):
        validate(raw, tmp_path)


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("+search.space.seeds={type:choice,values:[1]}", "search.space.seeds: unknown search key"),
        ("search.space.g_lr.type=normal", "search.space.g_lr.type: expected one of uniform"),
        ("search.space.g_lr.low=0", "search.space.g_lr.low: expected a positive float"),
        ("search.space.g_lr.high=1e-5", "search.space.g_lr.high: expected a value above low"),
        ("search.space.n_critic.values=[]", "search.space.n_critic.values: expected a non-empty"),
        ("search.space.n_critic.values=[0,1]", "search.space.n_critic.values: expected a positive"),
        ("search.space.n_critic.values=[1.5]", "search.space.n_critic.values: expected an integer"),
    ],
)
def test_invalid_space_names_key(tmp_path, override, start):
    message = config_error(tmp_path, override)
    assert message.startswith(start)


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("exp_name=digits", None),
        ("data.name=mnist", "data.name: unknown dataset 'mnist'"),
        ("data.channels=3", "data.channels: dataset 'digits' has 1 channel"),
        ("data.split=unlabeled", "data.split: dataset 'digits' has no split 'unlabeled'"),
        ("search.loss=wasserstein", "search.loss: unknown loss 'wasserstein'"),
        ("retrain.loss=wasserstein", "retrain.loss: unknown loss 'wasserstein'"),
        ("metrics.extractor=vgg", "metrics.extractor: unknown feature extractor 'vgg'"),
        ("retrain.baselines=[autogan]", "retrain.baselines[0]: unknown shipped genotype"),
        ("retrain.genotypes=[missing.json]", "retrain.genotypes[0]: "),
        ("metrics.inception_weights=none.pth", "metrics.inception_weights: file not found"),
        ("metrics.n_generated=999", "metrics.n_generated: expected at least 1000"),
        ("metrics.n_real=10", "metrics.n_real: expected at least 1000"),
        ("metrics.search_n_generated=1", "metrics.search_n_generated: expected at least 2"),
    ],
)
def test_names_and_counts_checked(tmp_path, override, start):
    if start is None:
        assert compose_in(tmp_path, override)["exp_name"] == "digits"
        return
    assert config_error(tmp_path, override).startswith(start)


# output_dir


def test_output_dir_under_file_rejected(tmp_path):
    (tmp_path / "file").write_text("")
    message = config_error(tmp_path, f"output_dir={tmp_path}/file/run")
    assert message.startswith("output_dir: cannot create")


def test_output_dir_that_is_file_rejected(tmp_path):
    (tmp_path / "file").write_text("")
    message = config_error(tmp_path, f"output_dir={tmp_path}/file")
    assert message.startswith("output_dir: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir_rejected(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    message = config_error(tmp_path, f"output_dir={locked}/run")
    assert message.startswith("output_dir: ")


def test_used_output_dir_needs_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    message = config_error(tmp_path, f"output_dir={tmp_path}/run")
    assert message.startswith("output_dir: ")
    assert "resume=true" in message
    cfg = compose_in(tmp_path, f"output_dir={tmp_path}/run", "resume=true")
    assert cfg["resume"] is True


# Saved config


def test_save_and_load_round_trip(tmp_path):
    cfg = compose_in(tmp_path)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_save_leaves_no_temporary_file(tmp_path):
    save_config(compose_in(tmp_path), tmp_path / "config.yaml")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["config.yaml"]


def test_save_failure_keeps_old_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    with pytest.raises(yaml.representer.RepresenterError):
        save_config({"bad": object()}, path)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_load_invalid_config_names_file(tmp_path):
    path = tmp_path / "config.yaml"
    cfg = compose_in(tmp_path)
    cfg["search"]["g_lr"] = -1
    save_config(cfg, path)
    with pytest.raises(ConfigError, match=r"config\.yaml: search\.g_lr: expected a positive"):
        load_config(path)


# The launcher as a subprocess: one line on stderr and exit status 2


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["exp=nope"], "error: exp: no config named 'nope'"),
        (["search.g_lr=-1"], "error: search.g_lr: expected a positive float, got -1"),
        (["search.nope=1"], "error: search.nope: unknown key"),
    ],
)
def test_launcher_rejects_with_exit_2(tmp_path, overrides, start):
    result = run_launcher(tmp_path, *overrides)
    assert result.returncode == 2
    assert result.stderr.startswith(start)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert not (tmp_path / "outputs").exists()


def test_launcher_rejects_unwritable_output_dir(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_launcher(tmp_path, "output_dir=file/run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: output_dir: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_launcher_help(tmp_path):
    result = run_launcher(tmp_path, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python runner/launch.py")
    assert "cifar10, digits, imagenette, stl10" in result.stdout


def test_launcher_as_module(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "runner.launch", "budget=nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: budget: no config named 'nope'")
