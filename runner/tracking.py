"""MLflow tracking of a launch: one parent run per launch, one child run per trial.

The driver opens a `Tracker`, which is the parent run. Trials in Ray workers receive
`Tracker.handle`, a plain dict, and open their own child run with `TrialRun.open`. Every process
talks to the same store through an `MlflowClient` built from that dict, so nothing unpicklable
crosses a process boundary and no process falls back to a local ./mlruns folder.

Logging never ends a trial. A failed call is retried with backoff, then kept in memory and
tried again later and when the run ends. Whatever still fails is reported in one warning per
run ("could not log N metrics to <uri>"). Metric values that are NaN or infinite are skipped
and their keys listed in the run tag `nonfinite_metrics`.
"""

import inspect
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,
    MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME,
    MLFLOW_PARENT_RUN_ID,
)
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from anas.errors import ConfigError
from runner.config import absolute_tracking_uri

log = logging.getLogger(__name__)

# The MLflow 3.x UI reads the experiment type from this experiment tag (mlflow/server/js in
# mlflow 3.17): "custom_model_development" is "Machine learning", which opens on the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
NONFINITE_TAG = "nonfinite_metrics"

TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Errors of the tracking store that retrying cannot fix: the request itself is wrong.
PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}
STORE_ERRORS = (MlflowException, SQLAlchemyError, OSError)

BACKOFF_S = 0.5  # first pause between retries; it doubles with each retry
# After a call exhausts its retries, later calls go straight to the buffer for this long, so a
# dead server costs a trial one round of retries per interval rather than one per call.
UNAVAILABLE_S = 30.0
MAX_BUFFERED = 10_000  # operations kept per run while the store is unavailable
MAX_PARAM_LENGTH = 250  # longer values (genotype blobs, long lists) are not logged as params
PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch request
METRICS_PER_BATCH = 1000
# Maximum wait of a queued metric (MlflowRun.queue_metrics) before it is sent. Sending one
# iteration's losses as a request of its own took 5 to 15 ms on a SQLite store (2-core CPU,
# mlflow 3.17), and one request with 100 iterations' losses took about 0.2 s.
METRIC_FLUSH_S = 10.0

_LOG_IMAGE_TAKES_STEP = "step" in inspect.signature(MlflowClient.log_image).parameters


# ---------------------------------------------------------------------------------------------
# The tracking store.


def default_tracking_uri(cfg: dict) -> str:
    """Return the SQLite store shared by every launch under `output_root`."""
    return "sqlite:///" + str(Path(cfg["output_root"]) / "mlflow.db")


def resolve_tracking_uri(cfg: dict, environ: Mapping[str, str] | None = None) -> str:
    """Pick the tracking URI: `mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else the default.

    A relative SQLite path or folder is made absolute, so that Ray trials, which run in their
    own working directories, open the same store.
    """
    environ = os.environ if environ is None else environ
    if cfg["mlflow"]["tracking_uri"]:
        return absolute_tracking_uri(cfg["mlflow"]["tracking_uri"], Path.cwd())
    if environ.get("MLFLOW_TRACKING_URI"):
        return absolute_tracking_uri(environ["MLFLOW_TRACKING_URI"], Path.cwd())
    return default_tracking_uri(cfg)


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def limit_http_retries(request_timeout_s: float) -> None:
    """Make MLflow's HTTP client fail fast, because this module retries with its own backoff.

    By default MLflow retries a failed request 7 times with exponential backoff, about 4
    minutes in all (mlflow/environment_variables.py, mlflow 3.17). Values already set in the
    environment are kept.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # MLflow parses this variable as an integer number of seconds.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(request_timeout_s))))


def check_tracking_store(uri: str, timeout_s: float) -> None:
    """Raise ConfigError naming `mlflow.tracking_uri` unless the store at `uri` can be used.

    A server must respond on its /health endpoint within `timeout_s`. A SQLite database gets its
    folder created.
    """
    if _is_server(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # the server responded; the API calls that follow show whether it is MLflow
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConfigError(
                f"mlflow.tracking_uri: the tracking server {uri} is unreachable ({reason}); "
                "start it, or set mlflow.tracking_uri to another server or a sqlite:/// path"
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"mlflow.tracking_uri: cannot create the folder of {path}: {error.strerror}"
            ) from None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Return where a new experiment keeps artifacts: beside a SQLite database, else the default.

    Without it MLflow uses ./mlruns under whatever directory the process started in.
    """
    if not uri.startswith("sqlite:///"):
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
    return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / safe).as_uri()


def ensure_experiment(client: MlflowClient, uri: str, name: str, primary_metric: str) -> str:
    """Return the id of experiment `name`, created as a model-training experiment if missing.

    Tags mark the experiment as machine learning (not GenAI) with `primary_metric` as its
    primary metric, lower is better, so the MLflow UI opens on the runs table sorted by it.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = _artifact_location(uri, name)
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(name).experiment_id  # a parallel launch
    elif experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"mlflow.experiment: experiment {name!r} is deleted in {uri}; restore it "
            "(mlflow experiments restore) or choose another mlflow.experiment"
        )
    else:
        experiment_id = experiment.experiment_id
    tags = {
        EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME: primary_metric,
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER: str(False),
    }
    for key, value in tags.items():
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys with string values, for MLflow params.

    Lists become JSON text. Values longer than MAX_PARAM_LENGTH, and mappings or lists under a
    key naming a genotype, are left out: genotypes are logged as JSON artifacts instead.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if "genotype" in str(key) and isinstance(value, (Mapping, list, tuple)):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        if len(text) <= MAX_PARAM_LENGTH and len(name) <= MAX_PARAM_LENGTH:
            flat[name] = text
    return flat


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------
# One run.


class MlflowRun:
    """Logging into one MLflow run that outlives an unavailable tracking store.

    `handle` is `Tracker.handle`. Every method returns normally whatever the store does; see
    `undelivered` for what could not be logged.
    """

    def __init__(self, handle: Mapping[str, Any], run_id: str | None, label: str):
        self.handle = dict(handle)
        self.tracking_uri: str = self.handle["tracking_uri"]
        self.run_id = run_id
        self.label = label  # names the run in log messages until it has an id
        self._client: MlflowClient | None = None
        self._create: Callable[[MlflowClient], str] | None = None
        self._buffer: list[tuple[str, int, Callable[[MlflowClient, str], Any]]] = []
        self._unavailable_until = 0.0
        self._last_error: BaseException | None = None
        self._warned = False
        self.undelivered: Counter[str] = Counter()  # kind -> values that were never logged
        self._nonfinite: set[str] = set()
        self._queued: list[Metric] = []  # see queue_metrics
        self._queued_since = 0.0
        self._ended = False
        limit_http_retries(self.handle["request_timeout_s"])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # Delivery: retries, the buffer and its flush.

    def _deliver(
        self, kind: str, count: int, operation: Callable[[MlflowClient, str], Any]
    ) -> bool:
        """Run `operation(client, run_id)`, retrying; buffer it when the store stays unavailable."""
        if time.monotonic() < self._unavailable_until:
            self._keep(kind, count, operation)
            return False
        if self._buffer and not self._flush():
            self._keep(kind, count, operation)
            return False
        for attempt in range(self.handle["max_retries"] + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                self._ensure_run()
                operation(self.client, self.run_id)
                return True
            except STORE_ERRORS as error:
                if getattr(error, "error_code", None) in PERMANENT_ERROR_CODES:
                    self._reject(kind, count, error)
                    return False
                self._last_error = error
        self._unavailable_until = time.monotonic() + UNAVAILABLE_S
        if not self._warned:
            self._warned = True
            log.warning(
                "logging to %s failed for run %s after %d retries (%s); buffering until the "
                "store responds again",
                self.tracking_uri,
                self._name(),
                self.handle["max_retries"],
                self._last_error,
            )
        self._keep(kind, count, operation)
        return False

    def _ensure_run(self) -> None:
        if self.run_id is None and self._create is not None:
            self.run_id = self._create(self.client)
            log.info("MLflow run %s is %s", self.label, self.run_id)

    def _keep(self, kind: str, count: int, operation) -> None:
        if len(self._buffer) >= MAX_BUFFERED:
            self.undelivered[kind] += count
            return
        self._buffer.append((kind, count, operation))

    def _flush(self) -> bool:
        """Send buffered operations in order, once each; return whether the buffer is empty."""
        while self._buffer:
            kind, count, operation = self._buffer[0]
            try:
                self._ensure_run()
                operation(self.client, self.run_id)
            except STORE_ERRORS as error:
                if getattr(error, "error_code", None) not in PERMANENT_ERROR_CODES:
                    self._last_error = error
                    self._unavailable_until = time.monotonic() + UNAVAILABLE_S
                    return False
                self._reject(kind, count, error)
            self._buffer.pop(0)
        self._unavailable_until = 0.0
        return True

    def _reject(self, kind: str, count: int, error: BaseException) -> None:
        """Count values the store rejected as invalid, warning once per kind (retries fail too)."""
        if kind not in self.undelivered:
            log.warning("MLflow rejected %s for run %s: %s", kind, self._name(), error)
        self.undelivered[kind] += count

    def _name(self) -> str:
        return self.run_id or self.label

    # Logging.

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flattened, short params (see flatten_params) in batches."""
        items = [Param(key, value) for key, value in flatten_params(params).items()]
        for chunk in _chunks(items, PARAMS_PER_BATCH):
            self._deliver(
                "params", len(chunk), lambda c, r, chunk=chunk: c.log_batch(r, params=chunk)
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of `metrics` at `step`; tag the keys of NaN or inf values."""
        self._send_metrics(self._metric_entries(metrics, step))

    def queue_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Like log_metrics, but send the values later, together with other queued ones.

        Queued values go out in one request when `flush_metrics` or `end` runs, when
        METRICS_PER_BATCH values are waiting, or at the first call made METRIC_FLUSH_S seconds
        or more after the oldest waiting value was queued. Each keeps its own step and
        timestamp. Values still queued when the process dies are lost.
        """
        if not self._queued:
            self._queued_since = time.monotonic()
        self._queued.extend(self._metric_entries(metrics, step))
        waited = time.monotonic() - self._queued_since
        if len(self._queued) >= METRICS_PER_BATCH or waited >= METRIC_FLUSH_S:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Send the metrics that queue_metrics has queued."""
        entries, self._queued = self._queued, []
        self._send_metrics(entries)

    def _metric_entries(self, metrics: Mapping[str, Any], step: int | None) -> list[Metric]:
        timestamp = _now_ms()
        entries, nonfinite = [], []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                nonfinite.append(key)
                continue
            entries.append(Metric(key, float(value), timestamp, int(step or 0)))
        if nonfinite:
            self._record_nonfinite(nonfinite, step)
        return entries

    def _send_metrics(self, entries: list[Metric]) -> None:
        for chunk in _chunks(entries, METRICS_PER_BATCH):
            self._deliver(
                "metrics", len(chunk), lambda c, r, chunk=chunk: c.log_batch(r, metrics=chunk)
            )

    def _record_nonfinite(self, keys: list[str], step: int | None) -> None:
        new = set(keys) - self._nonfinite
        if not new:
            return
        self._nonfinite |= new
        log.warning("run %s: skipped non-finite %s at step %s", self._name(), sorted(new), step)
        self.set_tags({NONFINITE_TAG: ",".join(sorted(self._nonfinite))})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(key, str(value)) for key, value in tags.items()]
        self._deliver("tags", len(items), lambda c, r: c.log_batch(r, tags=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts under `artifact_path`."""
        path = str(path)
        self._deliver("artifacts", 1, lambda c, r: c.log_artifact(r, path, artifact_path))

    def log_dict(self, dictionary: Mapping | list, artifact_file: str) -> None:
        """Store `dictionary` as a JSON (or YAML, by suffix) artifact."""
        data = json.loads(json.dumps(dictionary))  # a snapshot, in case the caller mutates it
        self._deliver("artifacts", 1, lambda c, r: c.log_dict(r, data, artifact_file))

    def log_image(self, image: Any, key: str, step: int) -> None:
        """Log an image (a PNG path, a PIL image or an HxWxC uint8 array) at `step` under `key`.

        MLflow clients whose log_image takes a step show it on the run's step slider; older ones
        store the file under images/.
        """
        if isinstance(image, (str, Path)):
            with Image.open(image) as opened:
                picture = opened.copy()
        else:
            picture = image
        if _LOG_IMAGE_TAKES_STEP:
            operation = lambda c, r: c.log_image(r, picture, key=key, step=int(step))  # noqa: E731
        else:
            artifact_file = f"images/{key}_step{int(step):08d}.png"
            operation = lambda c, r: c.log_image(r, picture, artifact_file)  # noqa: E731
        self._deliver("images", 1, operation)

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """Store rows of equal keys as an MLflow table artifact (JSON), viewable in the UI."""
        columns = list(rows[0]) if rows else []
        data = {column: [row.get(column) for row in rows] for column in columns}
        self._deliver("artifacts", 1, lambda c, r: c.log_table(r, data, artifact_file))

    # Ending.

    def end(self, status: str = "FINISHED") -> dict[str, int]:
        """Flush the buffer, mark the run `status` and return what could not be logged."""
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self._ended:
            return dict(self.undelivered)
        self._ended = True
        self.flush_metrics()

        # One last round of retries for the buffer, then the status.
        self._unavailable_until = 0.0
        for attempt in range(self.handle["max_retries"] + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            if self._flush():
                break
        self._deliver("status", 1, lambda c, r: c.set_terminated(r, status))
        if self._buffer:
            for kind, count, _ in self._buffer:
                self.undelivered[kind] += count
            self._buffer.clear()
        if self.undelivered:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.undelivered.items()))
            log.warning(
                "could not log %s to %s (run %s): %s",
                counts,
                self.tracking_uri,
                self._name(),
                self._last_error,
            )
        return dict(self.undelivered)

    def __enter__(self) -> "MlflowRun":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """End the run KILLED after KeyboardInterrupt, FAILED after another exception, else
        FINISHED, unless the code inside the block ended it already."""
        if kind is None:
            self.end("FINISHED")
        elif issubclass(kind, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")


class TrialRun(MlflowRun):
    """The child run of one trial, opened inside the Ray worker that runs the trial."""

    @classmethod
    def open(
        cls,
        tracking: Mapping[str, Any],
        stage: str,
        trial_name: str,
        trial_id: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> "TrialRun":
        """Create the child run of a trial under the launch's parent run, or reopen `run_id`.

        `tracking` is `Tracker.handle`. `stage` is "search" or "retrain". A restored trial
        passes the run id it had, and its run returns to RUNNING (params are not logged again,
        since MLflow forbids changing them). Without `run_id`, the run that an earlier attempt of
        the same trial created is reused if there is one. If the store is unavailable, the run
        is created once the store responds again.
        """
        run = cls(tracking, run_id, label=trial_name)
        all_tags = {
            MLFLOW_PARENT_RUN_ID: tracking["parent_run_id"],
            "stage": stage,
            "trial_id": trial_id,
            **{key: str(value) for key, value in (tags or {}).items()},
        }
        if run_id is not None:
            run._deliver("status", 1, lambda c, r: c.update_run(r, status="RUNNING"))
            run.set_tags(all_tags)
            return run

        def create(client: MlflowClient) -> str:
            # A trial restarted without a checkpoint (after a crash of its worker or of the
            # launch) continues the run of its earlier attempt instead of leaving it RUNNING.
            earlier = find_trial_run(client, tracking, trial_id)
            if earlier is not None:
                client.update_run(earlier, status="RUNNING")
                log.info("trial %s continues its MLflow run %s", trial_name, earlier)
                return earlier
            created = client.create_run(
                tracking["experiment_id"], tags=all_tags, run_name=trial_name
            )
            return created.info.run_id

        run._create = create
        run._deliver("run", 1, lambda c, r: None)
        if params:
            run.log_params(params)
        return run


# ---------------------------------------------------------------------------------------------
# The launch.


def find_trial_run(client: MlflowClient, tracking: Mapping[str, Any], trial_id: str) -> str | None:
    """Return the id of the child run of the launch tagged with Tune's `trial_id`, if any."""
    query = (
        f"tags.{MLFLOW_PARENT_RUN_ID} = '{tracking['parent_run_id']}' "
        f"and tags.trial_id = '{trial_id}'"
    )
    runs = client.search_runs([tracking["experiment_id"]], query, max_results=1)
    return runs[0].info.run_id if runs else None


def close_running_children(
    tracking_uri: str, parent_run_id: str, status: str = "KILLED"
) -> list[str]:
    """Mark every RUNNING child run of `parent_run_id` as `status`; return their ids.

    Trials that Ray killed (Ctrl-C, a lost node, a crash) could not end their own runs.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = (
        f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}' "
        f"and attributes.status = '{RunStatus.to_string(RunStatus.RUNNING)}'"
    )
    closed, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        for child in page:
            client.set_terminated(child.info.run_id, status)
            closed.append(child.info.run_id)
        token = page.token
        if not token:
            return closed


class Tracker(MlflowRun):
    """The parent run of a launch; use `Tracker.start(cfg)` as a context manager.

    Leaving the context ends the parent run FINISHED, FAILED after an exception or KILLED after
    KeyboardInterrupt, and first closes child runs still RUNNING (KILLED after an interrupt,
    else FAILED).
    """

    @classmethod
    def start(cls, cfg: dict, run_name: str | None = None) -> "Tracker":
        """Check the store, set up the experiment and start the parent run.

        Raises ConfigError naming `mlflow.tracking_uri` within about `mlflow.request_timeout_s`
        when the store cannot be reached.
        """
        settings = cfg["mlflow"]
        uri = resolve_tracking_uri(cfg)
        check_tracking_store(uri, settings["request_timeout_s"])
        limit_http_retries(settings["request_timeout_s"])
        client = MlflowClient(tracking_uri=uri)
        try:
            experiment_id = ensure_experiment(
                client, uri, settings["experiment"], settings["primary_metric"]
            )
            parent = client.create_run(
                experiment_id,
                run_name=run_name or Path(cfg["output_dir"]).name,
                tags={
                    "exp_name": cfg["exp_name"],
                    "budget_name": cfg["budget_name"],
                    "output_dir": cfg["output_dir"],
                },
            )
        except STORE_ERRORS as error:
            raise ConfigError(
                f"mlflow.tracking_uri: cannot use the tracking store {uri}: {error}"
            ) from None
        handle = {
            "tracking_uri": uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent.info.run_id,
            "max_retries": settings["max_retries"],
            "request_timeout_s": settings["request_timeout_s"],
            "primary_metric": settings["primary_metric"],
        }
        tracker = cls(handle, parent.info.run_id, label="launch")
        tracker._client = client
        log.info(
            "MLflow: experiment %r, parent run %s in %s",
            settings["experiment"],
            tracker.run_id,
            uri,
        )
        tracker.log_params(cfg)
        return tracker

    @classmethod
    def reopen(cls, cfg: dict, record: Mapping[str, Any], source: str) -> "Tracker":
        """Set the parent run of an earlier run of this launch RUNNING again and return it.

        `record` holds tracking_uri, experiment_id and parent_run_id, as read from `source`
        (output_dir/launch.json). Raises ConfigError naming `source` when the store cannot be
        used or no longer has the run.
        """
        settings = cfg["mlflow"]
        uri = record["tracking_uri"]
        check_tracking_store(uri, settings["request_timeout_s"])
        limit_http_retries(settings["request_timeout_s"])
        client = MlflowClient(tracking_uri=uri)
        run_id = record["parent_run_id"]
        try:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        except STORE_ERRORS as error:
            raise ConfigError(
                f"{source}: cannot reopen the launch's parent run {run_id} in {uri}: "
                f"{_first_line(error)}; restore the tracking store or start a new launch"
            ) from None
        handle = {
            "tracking_uri": uri,
            "experiment_id": run.info.experiment_id,
            "parent_run_id": run_id,
            "max_retries": settings["max_retries"],
            "request_timeout_s": settings["request_timeout_s"],
            "primary_metric": settings["primary_metric"],
        }
        tracker = cls(handle, run_id, label="launch")
        tracker._client = client
        resumes = int(run.data.tags.get("resumes", "0")) + 1
        tracker.set_tags({"resumes": str(resumes)})
        log.info("MLflow: continuing parent run %s in %s (resume %d)", run_id, uri, resumes)
        return tracker

    def close_earlier_parents(self, output_dir: str) -> list[str]:
        """Mark RUNNING parent runs of earlier runs of the launch in `output_dir` KILLED.

        A launch killed after it created its parent run but before it recorded the run in
        launch.json leaves that run RUNNING; the resumed launch starts a new one and tags the
        old one with `replaced_by`. Returns the ids closed ([] if the store is down).
        """
        query = f"tags.output_dir = '{output_dir}' and attributes.status = 'RUNNING'"
        try:
            runs = self.client.search_runs([self.experiment_id], query, max_results=100)
            earlier = [
                run.info.run_id
                for run in runs
                if run.info.run_id != self.run_id and MLFLOW_PARENT_RUN_ID not in run.data.tags
            ]
            for run_id in earlier:
                self.client.set_tag(run_id, "replaced_by", self.run_id)
                self.client.set_terminated(run_id, "KILLED")
        except STORE_ERRORS as error:
            log.warning("could not close earlier parent runs in %s: %s", self.tracking_uri, error)
            return []
        for run_id in earlier:
            log.warning("marked parent run %s KILLED; run %s replaces it", run_id, self.run_id)
        return earlier

    @property
    def record(self) -> dict[str, str]:
        """What output_dir/launch.json keeps: where the parent run is."""
        keys = ("tracking_uri", "experiment_id", "parent_run_id")
        return {key: self.handle[key] for key in keys}

    @property
    def experiment_id(self) -> str:
        return self.handle["experiment_id"]

    def log_leaderboard(
        self, rows: list[Mapping[str, Any]], files: Iterable[str | Path] = ()
    ) -> None:
        """Log the leaderboard on the parent run: a table, the given files, and the best FID.

        `rows` are ranked best first; the first row's primary metric becomes the parent's
        metric of the same name, so launches compare in the runs table.
        """
        self.log_table(list(rows), "leaderboard.json")
        for path in files:
            self.log_artifact(path)
        metric = self.handle["primary_metric"]
        if rows and metric in rows[0]:
            self.log_metrics({metric: rows[0][metric]})

    def close_running_children(self, status: str = "KILLED") -> list[str]:
        """Mark child runs still RUNNING as `status`; return their ids ([] if the store is down)."""
        try:
            closed = close_running_children(self.tracking_uri, self.run_id, status)
        except STORE_ERRORS as error:
            log.warning(
                "could not close the child runs of %s in %s: %s",
                self.run_id,
                self.tracking_uri,
                error,
            )
            return []
        if closed:
            log.warning("marked %d trial runs %s that were still RUNNING", len(closed), status)
        return closed

    def finish(self, status: str = "FINISHED") -> dict[str, int]:
        """Close RUNNING child runs, then end the parent run with `status`."""
        self.close_running_children("KILLED" if status == "KILLED" else "FAILED")
        return self.end(status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.finish("FINISHED")
        elif issubclass(kind, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")
