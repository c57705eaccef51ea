"""Start or join Ray for a launch: token authentication, runtime environment, storage paths.

`connect(cfg, tracking_uri)` is the one way a launch reaches Ray. It starts a local Ray, or
joins the cluster at `ray.address` ($RAY_ADDRESS when null), with the token that `ray.auth_mode`
and `ray.token_file` select. It passes the MLFLOW_* variables of the launching process (and,
with `ray.ship_code`, this project's packages) to every trial through Ray's runtime environment.
On a joined cluster it then checks from every node that the paths the trials use exist there.

Ray 2.60 enables token authentication by default for a local `ray.init()`, which reads the
token from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token and creates that file when
no token exists (ray/_private/authentication/authentication_token_setup.py). A malformed leftover file
makes the driver abort inside gRPC ("Illegal header value"). So a local launch always gets a
fresh token in $RAY_AUTH_TOKEN, which takes precedence over every token file.

Ray is imported inside functions, so runner.config can use the storage checks cheaply.
"""

import logging
import os
import re
import secrets
import uuid
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from anas.errors import ConfigError

log = logging.getLogger(__name__)

AUTH_MODES = ("token", "disabled")
# Schemes that pyarrow.fs.FileSystem.from_uri resolves (pyarrow 25), which Ray Tune uses for
# `storage_path`. Other fsspec filesystems need a pyarrow wrapper this launcher does not build.
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")

# The project's packages, uploaded to the nodes when `ray.ship_code` is true.
REPOSITORY = Path(__file__).resolve().parent.parent
PACKAGES = ("anas", "runner", "experiments")
SHIP_EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache"]

# Ray sends the token as a gRPC metadata value, which must be visible ASCII.
TOKEN_PATTERN = re.compile(r"[!-~]+")
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"  # under $HOME, where Ray 2.60 looks

# A node check starts one worker process per node; a fresh node with a shipped runtime
# environment first downloads and unpacks the packages.
NODE_CHECK_TIMEOUT_S = 120.0
NODE_CHECK_MARKER = ".anas-node-check-"


# ---------------------------------------------------------------------------------------------
# Storage paths and URIs.


def is_uri(path: str) -> bool:
    return "://" in path


def check_storage_path(path: str) -> str:
    """Return `storage.path` unchanged if Ray Tune can store results there, else raise.

    A local path is expected to be absolute already (runner.config resolves it). A URI must use
    one of STORAGE_SCHEMES and, except for file://, name a bucket or host. Reachability and
    credentials are not checked here, since that needs the network.
    """
    if not is_uri(path):
        return path
    scheme, _, rest = path.partition("://")
    if scheme.lower() not in STORAGE_SCHEMES:
        raise ConfigError(
            f"storage.path: unsupported URI scheme {scheme!r} in {path!r}; use a folder that "
            f"every node mounts, or a URI with one of {', '.join(STORAGE_SCHEMES)}"
        )
    if scheme.lower() != "file" and not rest.split("/", 1)[0].split("?", 1)[0]:
        raise ConfigError(f"storage.path: {path!r} names no bucket or host after {scheme}://")
    return path


def join_storage(base: str, *parts: str) -> str:
    """Join path components onto a local path or a URI, keeping a URI's query string last."""
    if not is_uri(base):
        return str(Path(base).joinpath(*parts))
    head, separator, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + separator + query


def launch_storage(cfg: dict) -> str:
    """Return the folder or URI that contains this launch's Ray Tune folders (search/, retrain/).

    With `storage.path` null it is output_dir. Otherwise it is
    <storage.path>/<exp_name>/<output_dir's name>, so launches sharing one storage.path do not
    mix their trials and a resumed launch (same output_dir) finds its own.
    """
    storage, output_dir = cfg["storage"]["path"], cfg["output_dir"]
    if storage == output_dir:
        return output_dir
    return join_storage(storage, cfg["exp_name"], Path(output_dir).name)


def local_path(path: str) -> str | None:
    """Return the local file system path of a plain path or a file:// URI, else None."""
    if not is_uri(path):
        return path
    parts = urlsplit(path)
    if parts.scheme.lower() == "file":
        return unquote(parts.path)
    return None


def read_storage_text(path: str, filesystem=None) -> str | None:
    """Return the text of a file in Ray Tune storage, or None when there is no such file.

    `filesystem` is a Tune result's pyarrow filesystem (`Result.filesystem`), whose paths carry
    no URI scheme; None reads the local file system.
    """
    if filesystem is None:
        file = Path(path)
        return file.read_text() if file.is_file() else None
    import pyarrow.fs

    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


# ---------------------------------------------------------------------------------------------
# Token authentication.


def ray_address(cfg: dict, environ: Mapping[str, str] | None = None) -> str | None:
    """Return the cluster to join: `ray.address`, else $RAY_ADDRESS; None starts a local Ray."""
    environ = os.environ if environ is None else environ
    address = cfg["ray"]["address"] or environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def read_token(path: str | Path, key: str) -> str:
    """Return the token stored in `path`, stripped of surrounding whitespace.

    Raises ConfigError naming `key` when the file is missing, unreadable, empty or contains
    characters that Ray cannot send (anything but visible ASCII).
    """
    path = Path(path).expanduser()
    try:
        text = path.read_bytes().decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        raise ConfigError(f"{key}: token file {path} not found") from None
    except OSError as error:
        raise ConfigError(f"{key}: cannot read the token file {path}: {error.strerror}") from None
    if not TOKEN_PATTERN.fullmatch(text):
        raise ConfigError(
            f"{key}: {path} does not contain a Ray token (one word of visible ASCII); "
            "`ray get-auth-token` on the head node prints the cluster's token"
        )
    return text


def configure_auth(
    cfg: dict, joining: bool, environ: MutableMapping[str, str] | None = None
) -> str:
    """Set RAY_AUTH_MODE and RAY_AUTH_TOKEN in `environ` for `ray.init`; return the token source.

    Starting a local Ray with `ray.auth_mode: token` uses `ray.token_file` when set, else a
    fresh random token, so a leftover ~/.ray/auth_token is never read. Joining a cluster uses
    `ray.token_file`, else $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray
    does. Every token is checked before Ray reads it, because Ray aborts the process on a
    malformed one. The returned text names the source for error messages.
    """
    environ = os.environ if environ is None else environ
    mode = cfg["ray"]["auth_mode"]
    environ["RAY_AUTH_MODE"] = mode
    if mode == "disabled":
        return "no token (ray.auth_mode is disabled)"

    token_file = cfg["ray"]["token_file"]
    if token_file:
        token, source = read_token(token_file, "ray.token_file"), f"ray.token_file ({token_file})"
    elif not joining:
        token, source = secrets.token_hex(32), "a fresh token for this launch"
    elif environ.get("RAY_AUTH_TOKEN", "").strip():
        token, source = environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
        if not TOKEN_PATTERN.fullmatch(token):
            raise ConfigError(
                "ray.token_file: $RAY_AUTH_TOKEN is not a Ray token (one word of visible ASCII); "
                "unset it or set ray.token_file to the cluster's token file"
            )
    else:
        home = Path(environ.get("HOME") or Path.home())
        path = environ.get("RAY_AUTH_TOKEN_PATH") or str(home / DEFAULT_TOKEN_FILE)
        if not Path(path).expanduser().is_file():
            raise ConfigError(
                f"ray.token_file: ray.auth_mode is token but no token was found for the cluster "
                f"(ray.token_file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH and {path} are all "
                "unset or missing); set ray.token_file to a file holding the output of "
                "`ray get-auth-token` on the head node, or ray.auth_mode=disabled for a cluster "
                "without token authentication"
            )
        token, source = read_token(path, "ray.token_file"), path

    # Ray prefers $RAY_AUTH_TOKEN over token files; dropping the path leaves one source.
    environ["RAY_AUTH_TOKEN"] = token
    environ.pop("RAY_AUTH_TOKEN_PATH", None)
    return source


def _refresh_ray_auth_settings() -> None:
    """Make Ray re-read RAY_AUTH_MODE and the token, which it caches once read.

    Ray does the same when it enables token authentication itself (ray 2.60,
    authentication_token_setup._enable_token_auth). These are private APIs, hence the guard.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        log.warning("this Ray version has no token loader to refresh; using its cached settings")
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# ---------------------------------------------------------------------------------------------
# Runtime environment.


def runtime_env(cfg: dict, tracking_uri: str, environ: Mapping[str, str] | None = None) -> dict:
    """Return the job's runtime environment: MLflow settings and, optionally, the packages.

    Every MLFLOW_* variable of the launching process travels to the trials, so a trial on
    another node logs to the same store with the same credentials. NOTE: Ray's dashboard shows
    a job's runtime environment, credentials in MLFLOW_TRACKING_PASSWORD or _TOKEN included.
    """
    environ = os.environ if environ is None else environ
    env_vars = {key: value for key, value in environ.items() if key.startswith("MLFLOW_")}
    env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    runtime = {"env_vars": env_vars}
    if cfg["ray"]["ship_code"]:
        runtime["py_modules"] = [str(REPOSITORY / name) for name in PACKAGES]
        runtime["excludes"] = list(SHIP_EXCLUDES)
    return runtime


# ---------------------------------------------------------------------------------------------
# Connecting.


def connect(cfg: dict, tracking_uri: str) -> bool:
    """Start a local Ray or join the configured cluster; return whether this call connected.

    The caller shuts Ray down when this returns True. Raises ConfigError naming `ray.address`,
    `ray.token_file` or `ray.auth_mode` when Ray cannot be started or joined, and the key of a
    path that some node cannot use (see check_nodes).
    """
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return False
    address = ray_address(cfg)
    joining = address is not None
    source = configure_auth(cfg, joining)
    _refresh_ray_auth_settings()
    where = f"at {address!r}" if joining else "locally"
    try:
        ray.init(
            address=address,
            runtime_env=runtime_env(cfg, tracking_uri),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as error:
        raise _connect_error(error, cfg, where, source) from None
    log.info("Ray %s: %s, token from %s", "joined" if joining else "started", where, source)
    if joining:
        try:
            check_nodes(cfg, tracking_uri)
        except BaseException:
            ray.shutdown()
            raise
    return True


def _rejected_token(error: BaseException | None) -> bool:
    """Return whether Ray failed because the cluster rejected the token.

    Ray 2.60 wraps the AuthenticationError of its GCS client into a RuntimeError whose message
    carries the original traceback as text, below a ConnectionError, hence the text match.
    """
    from ray.exceptions import AuthenticationError

    while error is not None:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _connect_error(error: BaseException, cfg: dict, where: str, source: str) -> ConfigError:
    if _rejected_token(error):
        if cfg["ray"]["auth_mode"] == "disabled":
            return ConfigError(
                f"ray.auth_mode: the Ray cluster {where} requires a token; set "
                "ray.auth_mode=token and ray.token_file to the cluster's token file"
            )
        return ConfigError(
            f"ray.token_file: the Ray cluster {where} rejected the token from {source}; set "
            "ray.token_file to a file holding the output of `ray get-auth-token` on its head node"
        )
    return ConfigError(f"ray.address: could not start or join Ray {where}: {error}")


def node_id() -> str:
    """Return the id of the Ray node running the calling task or actor (hex)."""
    import ray

    return ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------------
# Paths seen from every node.


def probe_paths(checks: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """Run on one node: return (key, problem) for each check that fails there.

    Each check is (key, path, kind): kind "exists" needs the path, "writable" creates the
    folder and needs write access, "marker" needs a file the driver wrote (shared storage).
    """
    problems = []
    for key, path, kind in checks:
        if kind == "writable":
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as error:
                problems.append((key, f"cannot create {path}: {error.strerror}"))
                continue
            if not os.access(path, os.W_OK | os.X_OK):
                problems.append((key, f"{path} is not writable"))
        elif kind == "marker" and not os.path.exists(path):
            folder = os.path.dirname(path)
            problems.append((key, f"{folder} is not the folder the launcher sees at that path"))
        elif kind == "exists" and not os.path.exists(path):
            problems.append((key, f"{path} not found"))
    return problems


def _local_store_folder(tracking_uri: str) -> str | None:
    """Return the local folder of a SQLite or file tracking store, else None (a server)."""
    if tracking_uri.startswith("sqlite:///"):
        database = tracking_uri[len("sqlite:///") :]
        return None if database == ":memory:" else os.path.dirname(database)
    return local_path(tracking_uri)


def _node_checks(cfg: dict, tracking_uri: str, marker_name: str) -> list[tuple[str, str, str]]:
    """Return the (key, path, kind) checks every node must pass, for probe_paths."""
    checks = [("cache_dir", cfg["cache_dir"], "writable")]
    storage = local_path(launch_storage(cfg))
    if storage is not None:
        checks.append(("storage.path", os.path.join(storage, marker_name), "marker"))
    store = _local_store_folder(tracking_uri)
    if store is not None:
        # A local store on a folder that a node does not share would split the launch's runs.
        checks.append(("mlflow.tracking_uri", os.path.join(store, marker_name), "marker"))
    if cfg["data"]["root"]:
        checks.append(("data.root", cfg["data"]["root"], "exists"))
    if cfg["metrics"]["inception_weights"]:
        checks.append(("metrics.inception_weights", cfg["metrics"]["inception_weights"], "exists"))
    return checks


NODE_CHECK_HINTS = {
    "cache_dir": "set cache_dir to a folder that every node can write",
    "storage.path": (
        "Ray Tune storage (storage.path, or output_dir when it is null) must be a folder that "
        "every node mounts at the same path, or an s3://, gs:// or abfs:// URI"
    ),
    "mlflow.tracking_uri": (
        "trials on that node would write to a separate store; run `mlflow server` and set "
        "mlflow.tracking_uri=http://HOST:PORT"
    ),
    "data.root": "put the dataset at the same path on every node, or on a shared folder",
    "metrics.inception_weights": "put the weights file at the same path on every node",
}


def check_nodes(cfg: dict, tracking_uri: str) -> None:
    """Check from every alive node that the launch's folders and files are usable there.

    Raises ConfigError naming the key of the first path that fails, with the node, and
    naming `ray.ship_code` when a node cannot import this project. NOTE: nodes that an
    autoscaler adds later are not checked, and neither is a storage URI, because reaching
    it needs the nodes' cloud credentials and network.
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker_name = f"{NODE_CHECK_MARKER}{uuid.uuid4().hex}"
    checks = _node_checks(cfg, tracking_uri, marker_name)
    markers = {key: Path(path) for key, path, kind in checks if kind == "marker"}
    try:
        for key, marker in markers.items():
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text("written by the launcher to check that every node sees it\n")
            except OSError as error:
                raise ConfigError(
                    f"{key}: cannot write to {marker.parent}: {error.strerror}"
                ) from None
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(probe_paths)
        pending = {
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(checks): node
            for node in nodes
        }
        for ref, node in pending.items():
            name = f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})"
            try:
                problems = ray.get(ref, timeout=NODE_CHECK_TIMEOUT_S)
            except GetTimeoutError:
                raise ConfigError(
                    f"ray.address: node {name} did not run the path check within "
                    f"{NODE_CHECK_TIMEOUT_S:g} s; check that the node is healthy"
                ) from None
            except RayError as error:
                raise ConfigError(
                    f"ray.ship_code: node {name} could not run this project's code "
                    f"({type(error).__name__}: {str(error).splitlines()[0]}); install the "
                    "project on every node (the docker image does) or set ray.ship_code=true"
                ) from None
            if problems:
                key, problem = problems[0]
                raise ConfigError(f"{key}: on node {name}, {problem}; {NODE_CHECK_HINTS[key]}")
        log.info("checked the launch's paths on %d Ray nodes", len(nodes))
    finally:
        for marker in markers.values():
            marker.unlink(missing_ok=True)
