"""The files under docker/: compose.yaml, the Dockerfile and the cluster launcher's cluster.yaml.

No Docker engine runs the tests, so the files are parsed and checked against what this
environment installs: the project's console scripts, and the commands and options of the
`ray` and `mlflow` command-line tools.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import jsonschema
import pytest
import ray.autoscaler
import yaml
from mlflow.cli import cli as mlflow_cli
from ray.scripts.scripts import cli as ray_cli

tomllib = pytest.importorskip("tomllib")  # in the standard library from Python 3.11

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKER = REPOSITORY / "docker"
PROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
CONSOLE_SCRIPTS = set(PROJECT["scripts"])
CLICK_TOOLS = {"ray": ray_cli, "mlflow": mlflow_cli}
# The image's entry point, copied from docker/entrypoint.sh by the Dockerfile.
ENTRYPOINT = "anas-entrypoint"
# Services that run an image other than the project's.
OTHER_IMAGES = {"postgres"}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def with_defaults(text: str) -> str:
    """Interpolate ${NAME:-default} and ${NAME} as compose does with none of them set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def check_command(argv: list[str]) -> None:
    """Assert that `argv` names an installed program and, for ray and mlflow, real options."""
    program, arguments = argv[0], list(argv[1:])
    if program == ENTRYPOINT:
        return
    if program in CONSOLE_SCRIPTS:
        assert Path(sys.executable).with_name(program).is_file(), f"{program} is not installed"
        return
    assert program in CLICK_TOOLS, f"{program!r} is no console script, ray or mlflow"
    assert Path(sys.executable).with_name(program).is_file(), f"{program} is not installed"
    command = CLICK_TOOLS[program]
    while isinstance(command, click.Group) and arguments and arguments[0] in command.commands:
        command = command.commands[arguments.pop(0)]
    assert not isinstance(command, click.Group), f"{argv[:2]} names no subcommand"
    known = option_names(command)
    for argument in arguments:
        if argument.startswith("--"):
            name = argument.split("=", 1)[0]
            assert name in known, f"{program} {command.name} has no option {name}"


def shell_commands(script: str) -> list[list[str]]:
    """Split a shell line into the argument lists of its ray and mlflow commands."""
    commands = []
    for part in re.split(r";|&&|\|\|", script):
        words = shlex.split(part)
        while words and words[0] in ("nohup", "exec"):
            words = words[1:]
        if words and words[0] in CLICK_TOOLS:
            commands.append(words)
    return commands


# ---------------------------------------------------------------------------------------------
# compose.yaml


COMPOSE = load_yaml("compose.yaml")
SERVICES = COMPOSE["services"]
PROJECT_SERVICES = sorted(set(SERVICES) - OTHER_IMAGES)


def test_compose_services():
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= set(SERVICES)


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_service_uses_project_image(name):
    service = SERVICES[name]
    image = with_defaults(service["image"])
    assert image.split(":")[0] == PROJECT["name"]
    build = service["build"]
    assert (DOCKER / build["context"]).resolve() == REPOSITORY
    assert (REPOSITORY / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


@pytest.mark.parametrize("name", PROJECT_SERVICES)
def test_service_command_installed(name):
    check_command([str(word) for word in SERVICES[name]["command"]])


@pytest.mark.parametrize("name", sorted(n for n in SERVICES if "healthcheck" in SERVICES[n]))
def test_service_healthcheck_parses(name):
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    if test[1] == "python":
        compile(test[3], f"{name} health check", "exec")


def test_ports_bound_to_loopback():
    published = [port for service in SERVICES.values() for port in service.get("ports", [])]
    assert published
    for port in published:
        assert with_defaults(port).startswith("127.0.0.1:"), port


def test_published_ports():
    ports = [port for service in SERVICES.values() for port in service.get("ports", [])]
    targets = {with_defaults(port).rsplit(":", 1)[1] for port in ports}
    assert targets == {"5000", "8265"}


def test_mlflow_serves_artifacts_from_postgres():
    command = [with_defaults(str(word)) for word in SERVICES["mlflow"]["command"]]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    assert any(word.startswith("--artifacts-destination=") for word in command)
    backend = [word for word in command if word.startswith("--backend-store-uri=")]
    assert backend == ["--backend-store-uri=postgresql+psycopg2://mlflow@postgres:5432/mlflow"]
    assert "postgres" in SERVICES["mlflow"]["depends_on"]


def test_mlflow_allows_service_host():
    command = [with_defaults(str(word)) for word in SERVICES["mlflow"]["command"]]
    (hosts,) = [word.split("=", 1)[1] for word in command if word.startswith("--allowed-hosts")]
    tracking_uri = SERVICES["ray-head"]["environment"]["MLFLOW_TRACKING_URI"]
    assert tracking_uri.removeprefix("http://") in hosts.split(",")


def test_workers_reserve_gpus():
    devices = SERVICES["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert int(with_defaults(str(devices[0]["count"]))) >= 1


def test_workers_join_head():
    command = SERVICES["ray-worker"]["command"]
    assert "--address=ray-head:6379" in command
    assert "--port=6379" in SERVICES["ray-head"]["command"]


def test_ray_token_from_secret():
    for name in ("ray-head", "ray-worker"):
        service = SERVICES[name]
        assert service["environment"]["RAY_AUTH_MODE"] == "token"
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert "ray_auth_token" in service["secrets"]


def test_declared_volumes_and_secrets():
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = with_defaults(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in COMPOSE["volumes"], f"undeclared volume {source}"
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"]


def test_secret_files_ignored_by_git():
    files = [DOCKER / secret["file"] for secret in COMPOSE["secrets"].values()]
    result = subprocess.run(
        ["git", "check-ignore", *map(str, files)], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert result.stdout.split() == [str(file) for file in files]


# ---------------------------------------------------------------------------------------------
# The Dockerfile and its entry point


DOCKERFILE = (DOCKER / "Dockerfile").read_text()
INSTRUCTIONS = [
    line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines() if line.strip()
]


def instructions(keyword: str) -> list[str]:
    return [line[len(keyword) :].strip() for line in INSTRUCTIONS if line.startswith(keyword)]


def test_dockerfile_cuda_base():
    (base,) = [line for line in instructions("ARG ") if line.startswith("BASE_IMAGE=")]
    assert base.startswith("BASE_IMAGE=nvidia/cuda:")
    assert "runtime" in base
    assert instructions("FROM ") == ["${BASE_IMAGE}"]


def test_dockerfile_installs_project():
    copied = {line.split()[0] for line in instructions("COPY ")}
    assert {"anas", "runner", "experiments", "pyproject.toml"} <= copied
    assert "pip install --no-deps ." in instructions("RUN ")
    assert "['optional-dependencies']['cluster']" in DOCKERFILE
    assert "cluster" in PROJECT["optional-dependencies"]


def test_dockerignore_keeps_copied_files():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for line in instructions("COPY "):
        assert f"!{line.split()[0]}" in ignore


def test_entrypoint():
    assert instructions("ENTRYPOINT ") == [f'["{ENTRYPOINT}"]']
    assert f"docker/entrypoint.sh /usr/local/bin/{ENTRYPOINT}" in instructions("COPY ")
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    check_command(json.loads(instructions("CMD ")[0]))


def test_entrypoint_exports_password(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {"PATH": os.environ["PATH"], "POSTGRES_PASSWORD_FILE": str(secret)}
    result = subprocess.run(
        [str(DOCKER / "entrypoint.sh"), "sh", "-c", 'printf %s "$PGPASSWORD"'],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.stdout == "s3cret"


# ---------------------------------------------------------------------------------------------
# cluster.yaml (Ray's cluster launcher)


CLUSTER = load_yaml("cluster.yaml")


def test_cluster_yaml_schema():
    schema_path = Path(ray.autoscaler.__file__).with_name("ray-schema.json")
    jsonschema.validate(CLUSTER, json.loads(schema_path.read_text()))


def test_cluster_uses_project_image():
    repository, tag = CLUSTER["docker"]["image"].rsplit("/", 1)[1].split(":")
    compose_image = with_defaults(SERVICES["ray-head"]["image"])
    assert f"{repository}:{tag}" == compose_image


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_cluster_start_commands(key):
    commands = [argv for line in CLUSTER[key] for argv in shell_commands(line)]
    assert ["ray", "stop"] in commands
    assert any(argv[:2] == ["ray", "start"] for argv in commands)
    for argv in commands:
        check_command(argv)


def test_cluster_installs_nothing():
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert CLUSTER[key] == []


def test_cluster_token_from_synced_secret():
    options = " ".join(CLUSTER["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in options
    (path,) = re.findall(r"RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert CLUSTER["file_mounts"][os.path.dirname(path)] == "./docker/secrets"


def test_cluster_holds_no_account_ids():
    text = (DOCKER / "cluster.yaml").read_text()
    assert not re.findall(r"\b\d{12}\b", text)
    assert not re.findall(r"AKIA[0-9A-Z]{16}", text)
