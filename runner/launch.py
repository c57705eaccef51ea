"""Launch the search and retrain stages: `python runner/launch.py [KEY=VALUE ...]`.

Also runnable as `python -m runner.launch` and as the console script `anas-launch`. A launch
composes and validates the config, checks the MLflow store, decodes the dataset and reads the
genotype files, starts or joins Ray, fits the per-trial resources to the cluster, writes
output_dir/config.yaml, opens the MLflow parent run (recorded in output_dir/launch.json), runs
both stages and prints the leaderboard to stdout. Progress goes to stderr.

`resume=true output_dir=DIR` continues the launch in DIR with the config saved there: it reopens
the same parent run, skips a search stage that ended (output_dir/handoff.json), keeps finished
trials and continues interrupted or errored ones from their last checkpoints.

Exit status: 0 on success; 2 on invalid input, with one line `error: <message>` on stderr;
130 after Ctrl-C or SIGTERM; 1 on anything else, with its traceback.
"""

import json
import logging
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: Python put runner/ on sys.path, but the packages live one level up.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anas.errors import ConfigError  # noqa: E402
from experiments import CONFIG_DIR  # noqa: E402
from runner import cluster  # noqa: E402
from runner.config import (  # noqa: E402
    check_genotype_files,
    compose,
    resumed_config,
    save_config,
)
from runner.preflight import check_resources  # noqa: E402
from runner.tracking import Tracker, check_tracking_store, resolve_tracking_uri  # noqa: E402

log = logging.getLogger("runner.launch")

# File in output_dir that records the launch's MLflow parent run; the report reads it too.
LAUNCH_RECORD = "launch.json"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that log routine steps at INFO (database migrations, Ray start-up) to the console.
QUIET_LOGGERS = ("alembic", "mlflow", "ray", "urllib3", "filelock")


def usage() -> str:
    """Return the help text, listing the experiment and budget files that exist."""
    exps = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "exp").glob("*.yaml")))
    budgets = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "budget").glob("*.yaml")))
    return (
        "usage: python runner/launch.py [exp=NAME] [budget=NAME] [KEY=VALUE ...]\n"
        "\n"
        "Search GAN architectures with AdversarialNAS, retrain the best and rank them by FID.\n"
        "With no arguments: exp=digits budget=smoke, a few minutes on a CPU.\n"
        "\n"
        f"  exp=NAME      experiment (dataset and image size): {exps}\n"
        f"  budget=NAME   sizes (iterations, batches, widths, sample counts): {budgets}\n"
        "  KEY=VALUE     any key of experiments/config.yaml, e.g. search.seeds=[0,1] "
        "resources.gpu=0.5\n"
        "\n"
        "Results go to output_dir (default outputs/<exp>/<date-time>/) and to MLflow\n"
        "(default sqlite:///<cwd>/outputs/mlflow.db). The leaderboard is printed to stdout.\n"
    )


def configure_logging() -> None:
    """Send log records of every library to stderr in one format."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT, force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_stages(cfg: dict, tracker: Tracker) -> str:
    """Run both stages through runner.stages.run_launch; return the leaderboard text."""
    from runner import stages

    run_launch = getattr(stages, "run_launch", None)
    if run_launch is None:
        # TODO: remove once runner.stages provides run_launch(cfg, tracker) -> str.
        raise NotImplementedError(
            "runner.stages.run_launch(cfg, tracker) does not exist yet; the launcher validated "
            "the config, checked resources and opened tracking, but cannot run the stages"
        )
    return run_launch(cfg, tracker)


def read_launch_record(output_dir: Path) -> dict | None:
    """Return output_dir/launch.json (where the parent run is), or None if it was not written."""
    path = output_dir / LAUNCH_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: invalid launch record ({error}); start a new launch") from None
    keys = ("tracking_uri", "experiment_id", "parent_run_id")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in keys):
        raise ConfigError(f"{path}: expected the keys {', '.join(keys)}; start a new launch")
    return record


def write_launch_record(output_dir: Path, record: dict) -> None:
    path = output_dir / LAUNCH_RECORD
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2), encoding="utf-8")
    temporary.replace(path)


def check_data(cfg: dict) -> None:
    """Decode the training split and the metrics' split before any trial starts.

    Trials read both from the cache this fills. A missing, empty or inconsistent dataset, or too
    few images for `metrics.n_real`, raises ConfigError here rather than inside every trial.
    """
    from anas.data import load_images
    from anas.metrics import _check_n_real  # the same rule the evaluator applies in trials

    try:
        load_images(cfg["data"], "train", cfg["cache_dir"])
        real = load_images(cfg["data"], cfg["data"]["split"], cfg["cache_dir"])
    except PermissionError as error:
        raise ConfigError(f"cache_dir: cannot write {error.filename}: {error.strerror}") from None
    _check_n_real(cfg["metrics"]["n_real"], real)


def launch(overrides: list[str]) -> str:
    """Run one launch end to end and return the leaderboard text (see the module docstring)."""
    cfg = compose(overrides)
    output_dir = Path(cfg["output_dir"])
    record = None
    if cfg["resume"] and (output_dir / "config.yaml").is_file():
        cfg = resumed_config(cfg, overrides)
        record = read_launch_record(output_dir)
        log.info("resuming the launch in %s", output_dir)

    # Tracking first: an unreachable server fails in seconds, before Ray starts.
    uri = record["tracking_uri"] if record else resolve_tracking_uri(cfg)
    check_tracking_store(uri, cfg["mlflow"]["request_timeout_s"])
    # Fluent mlflow calls in this process and in the Ray workers it starts use the same store.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # Let Ctrl-C raise KeyboardInterrupt out of Tuner.fit, so the launch ends its runs KILLED;
    # Ray Tune's own handler would stop the stage and let the launch carry on.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    check_data(cfg)
    check_genotype_files(cfg)

    started_ray = cluster.connect(cfg, uri)
    try:
        cfg["resources"].update(check_resources(cfg))
        config_path = output_dir / "config.yaml"
        try:
            save_config(cfg, config_path)
        except OSError as error:
            raise ConfigError(f"output_dir: cannot write {config_path}: {error}") from None
        log.info(
            "launch %s/%s: writing to %s", cfg["exp_name"], cfg["budget_name"], cfg["output_dir"]
        )

        if record:
            tracker = Tracker.reopen(cfg, record, str(output_dir / LAUNCH_RECORD))
        else:
            tracker = Tracker.start(cfg)
            if cfg["resume"]:
                tracker.close_earlier_parents(cfg["output_dir"])
        with tracker:
            if not record:
                # Written first, so that a resumed launch finds this parent run again.
                write_launch_record(output_dir, tracker.record)
            tracker.log_artifact(config_path)
            try:
                return run_stages(cfg, tracker)
            finally:
                # Trials stop writing to their runs before the tracker closes the runs left open.
                if started_ray:
                    stop_ray()
    finally:
        if started_ray:
            stop_ray()


def main(argv: list[str] | None = None) -> int:
    """Run the launcher with `argv` (default: the command line) and return its exit status."""
    overrides = sys.argv[1:] if argv is None else list(argv)
    if "-h" in overrides or "--help" in overrides:
        print(usage(), end="")
        return 0
    configure_logging()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        leaderboard = launch(overrides)
    except ConfigError as error:
        message = " ".join(line.strip() for line in str(error).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(leaderboard, end="" if leaderboard.endswith("\n") else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
