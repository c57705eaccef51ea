"""Ray Tune trial functions: the anas search and retrain loops, reporting through Tune.

Each function runs in a Ray worker. It rebuilds its state from the last Tune checkpoint when
there is one, reports metrics with `tune.report` at every evaluation (with a checkpoint at the
first and last evaluation and at most every `tune.checkpoint_interval_s` seconds between), and
logs losses, metrics, sample grids and genotypes to its own MLflow child run. Results that the
driver needs later (genotypes, parameter counts, the run id) travel in the reported metrics, so
the hand-off works even when trial folders live on other nodes.
"""

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ray import tune

from anas.allocator import keep_freed_memory
from anas.checkpoint import load_checkpoint, save_checkpoint
from anas.data import BatchStream, load_images
from anas.errors import ConfigError, NonFiniteLossError
from anas.genotypes import genotype_from_dict
from anas.metrics import Evaluator, save_grid
from anas.retrain import Retrain, RetrainSettings
from anas.search import Search, SearchSettings
from anas.svg import write_cells_svg, write_edge_weights_svg
from runner.cluster import node_id
from runner.tracking import TrialRun

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# The value a trial with a non-finite loss or metric reports as its FID, so that a searcher
# minimising FID treats it as the worst result; rankings drop such trials by `failure`.
WORST_FID = 1e9


def trial_device(launch: dict) -> torch.device:
    """CUDA when Ray granted this trial a GPU (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    threads = max(1, int(launch["resources"]["cpu"]))
    torch.set_num_threads(threads)
    keep_freed_memory()  # every step allocates the same buffers again
    if torch.cuda.is_available() and launch["resources"]["gpu"] > 0:
        return torch.device("cuda")
    return torch.device("cpu")


def restore_state() -> dict | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / STATE_FILE)


def report(metrics: dict, state: Callable[[], dict] | None) -> None:
    """Report to Tune, with a checkpoint holding `state()` (tensors and plain data only) unless
    `state` is None."""
    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / STATE_FILE, state())
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class CheckpointSchedule:
    """Checkpoint timing of a trial's reports: the first and the last carry one, and any other
    report does once `interval_s` seconds have passed since the previous checkpoint.

    Saving and persisting a checkpoint took about 0.1 s per report at the smoke sizes on a
    2-core CPU, so checkpointing every evaluation of a one-minute trial cost 2% of it. A trial
    that resumes repeats the iterations since its last checkpoint.
    """

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.last: float | None = None

    def due(self, final: bool) -> bool:
        now = time.monotonic()
        if final or self.last is None or now - self.last >= self.interval_s:
            self.last = now
            return True
        return False


def finite(metrics: dict) -> dict:
    """Return the numeric entries of `metrics` that are finite."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def check_finite(metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteLossError(f"{key} is {value} at step {step}")


def _log_grid(run: TrialRun, images: torch.Tensor, step: int, folder: Path) -> None:
    path = folder / f"samples_{step:06d}.png"
    save_grid(images, path, nrow=8)
    run.log_image(path, "samples", step)


class DiagramLog:
    """SVG cell diagrams of genotypes, logged under the run's diagrams/ artifacts.

    Each genotype is drawn once: logging one again, as a search does while its derived cells
    stay the same and at its end, logs the file already written. The report draws PNG versions
    of the leaderboard's genotypes with matplotlib, once per launch instead of per evaluation.
    """

    def __init__(self, run: TrialRun, folder: Path):
        self.run = run
        self.folder = folder
        self.drawn: dict[str, Path] = {}  # "<network>-<hash>" -> file

    def log(self, genotypes, name: str) -> None:
        """Log the diagrams of `genotypes` under diagrams/<name>/, named after their network."""
        for genotype in genotypes:
            key = f"{genotype.network}-{genotype.hash}"
            if key not in self.drawn:
                path = self.folder / key / f"{genotype.network}.svg"
                self.drawn[key] = write_cells_svg(genotype, path)
            self.run.log_artifact(self.drawn[key], f"diagrams/{name}")


def report_invalid_input(error: ConfigError) -> None:
    """End the trial with bad input it met, for the driver to raise (see StopOnInvalidInput).

    A retry would meet the same input, so the trial reports instead of raising.
    """
    message = " ".join(line.strip() for line in str(error).splitlines())
    log.error("trial %s: %s", tune.get_context().get_trial_name(), message)
    tune.report(
        {
            "fid": WORST_FID,
            "invalid_input": message,
            "failure": f"invalid input: {message}",
            "completed": True,
        }
    )


def end_non_finite(run: TrialRun, stage: str, error: NonFiniteLossError) -> None:
    """End a trial whose loss or metric became NaN or infinite, as the worst result.

    A retry would repeat the NaN, so the trial reports instead of raising.
    """
    log.warning("%s trial %s stopped: %s", stage, tune.get_context().get_trial_name(), error)
    run.set_tags({"failure": f"non-finite: {error}"})
    run.end("FAILED")
    tune.report({"fid": WORST_FID, "failure": f"non-finite: {error}", "completed": True})


def search_trial(config: dict, launch: dict, tracking: dict) -> None:
    """Run one search trial: a supernet searched from `config["seed"]` with sampled settings."""
    try:
        _search_trial(config, launch, tracking)
    except ConfigError as error:
        report_invalid_input(error)


def retrain_trial(config: dict, launch: dict, tracking: dict, candidates: list) -> None:
    """Run one retrain trial: candidate `config["candidate"]` trained from scratch."""
    try:
        _retrain_trial(config, launch, tracking, candidates)
    except ConfigError as error:
        report_invalid_input(error)


def _search_trial(config: dict, launch: dict, tracking: dict) -> None:
    started = time.monotonic()
    seed = int(config["seed"])
    sampled = {k: v for k, v in config.items() if k != "seed"}
    device = trial_device(launch)
    settings = SearchSettings.from_config(launch, sampled)
    stream = BatchStream(load_images(launch["data"], "train", launch["cache_dir"]), seed, device)
    search = Search(settings, device, seed)
    evaluator = Evaluator.from_config(launch, device)
    history: list = []  # edge weights at every evaluation, for the alpha/beta heatmaps
    state = restore_state()
    elapsed = 0.0
    run_id = None
    if state is not None:
        search.load_state_dict(state["search"])
        stream.load_state_dict(state["stream"])
        history = json.loads(state["history"])
        elapsed = float(state["elapsed"])
        run_id = state["run_id"]
    context = tune.get_context()
    run = TrialRun.open(
        tracking,
        stage="search",
        trial_name=context.get_trial_name(),
        trial_id=context.get_trial_id(),
        tags={"seed": str(seed)},
        params={"seed": seed, **sampled},
        run_id=run_id,
    )
    folder = Path(tempfile.mkdtemp(prefix="anas-search-"))
    diagrams = DiagramLog(run, folder)
    schedule = CheckpointSchedule(launch["tune"]["checkpoint_interval_s"])
    s = launch["search"]
    try:
        while search.iteration < settings.iterations:
            losses = search.step(stream)
            step = search.iteration
            run.queue_metrics(losses, step)
            if step % s["eval_every"] and step < settings.iterations:
                continue

            # Evaluation: a cheap FID of the supernet's samples, genotypes, entropies.
            n = launch["metrics"]["search_n_generated"]
            scores = evaluator.evaluate(lambda k: search.sample(k, seed), n, metrics=("fid",))
            check_finite({"fid": scores["fid"]}, step)
            genotype_g, genotype_d = search.genotypes()
            evaluation = {**search.entropy(), "fid": scores["fid"], "iteration": step}
            run.queue_metrics(finite(evaluation), step)
            run.flush_metrics()
            metrics = {**losses, **evaluation}
            run.log_dict(genotype_g.to_dict(), f"genotypes/generator_{step:06d}.json")
            run.log_dict(genotype_d.to_dict(), f"genotypes/discriminator_{step:06d}.json")
            diagrams.log((genotype_g, genotype_d), f"step{step:06d}")
            _log_grid(run, search.sample(64, seed), step, folder)
            history.append({"step": step, "weights": search.edge_weights()})
            metrics |= {
                "genotype_generator": json.dumps(genotype_g.to_dict()),
                "genotype_discriminator": json.dumps(genotype_d.to_dict()),
                "genotype_hash": genotype_g.hash,
                "protocol": json.dumps(scores["protocol"]),
                "mlflow_run_id": run.run_id,
                "device_seconds": elapsed + time.monotonic() - started,
                "device": str(device),
                "node_id": node_id(),
                "completed": step >= settings.iterations,
            }
            run.set_tags({"genotype_hash": genotype_g.hash})

            def state() -> dict:
                return {
                    "search": search.state_dict(),
                    "stream": stream.state_dict(),
                    "history": json.dumps(history),
                    "elapsed": elapsed + time.monotonic() - started,
                    "run_id": run.run_id,
                }

            report(metrics, state if schedule.due(metrics["completed"]) else None)
        run.log_dict({"history": history}, "edge_weights.json")
        for network, name in (("generator", "alpha"), ("discriminator", "beta")):
            run.log_artifact(
                write_edge_weights_svg(history, network, folder / f"{name}.svg"), "diagrams"
            )
        diagrams.log(search.genotypes(), "final")
        run.end("FINISHED")
    except NonFiniteLossError as error:
        end_non_finite(run, "search", error)
    except BaseException:
        run.end("FAILED")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _retrain_trial(config: dict, launch: dict, tracking: dict, candidates: list) -> None:
    started = time.monotonic()
    seed = int(config["seed"])
    candidate = candidates[int(config["candidate"])]
    device = trial_device(launch)
    genotype_g = genotype_from_dict(candidate["generator"], candidate["source"])
    if launch["retrain"]["discriminator"] == "autogan" or candidate.get("discriminator") is None:
        d_spec = "autogan"
    else:
        d_spec = genotype_from_dict(candidate["discriminator"], candidate["source"])
    settings = RetrainSettings.from_config(launch)
    retrain = Retrain(settings, genotype_g, d_spec, device, seed)
    stream = BatchStream(load_images(launch["data"], "train", launch["cache_dir"]), seed, device)
    evaluator = Evaluator.from_config(launch, device)
    state = restore_state()
    elapsed, run_id = 0.0, None
    if state is not None:
        retrain.load_state_dict(state["retrain"])
        stream.load_state_dict(state["stream"])
        elapsed = float(state["elapsed"])
        run_id = state["run_id"]
    context = tune.get_context()
    counts = retrain.parameter_counts()
    run = TrialRun.open(
        tracking,
        stage="retrain",
        trial_name=context.get_trial_name(),
        trial_id=context.get_trial_id(),
        tags={
            "seed": str(seed),
            "genotype_hash": genotype_g.hash,
            "discriminator": d_spec if isinstance(d_spec, str) else d_spec.hash,
            "source": candidate["label"],
        },
        params={"seed": seed, "candidate": candidate["label"], **counts},
        run_id=run_id,
    )
    folder = Path(tempfile.mkdtemp(prefix="anas-retrain-"))
    if state is None:
        run.log_dict(genotype_g.to_dict(), "genotypes/generator.json")
        if not isinstance(d_spec, str):
            run.log_dict(d_spec.to_dict(), "genotypes/discriminator.json")
        drawn = (genotype_g,) if isinstance(d_spec, str) else (genotype_g, d_spec)
        DiagramLog(run, folder).log(drawn, "architecture")
    r = launch["retrain"]
    schedule = CheckpointSchedule(launch["tune"]["checkpoint_interval_s"])
    try:
        while not retrain.done:
            losses = retrain.step(stream)
            if "g_loss" not in losses:
                continue  # a discriminator update inside the n_critic cycle
            step = retrain.g_steps
            run.queue_metrics(losses, step)
            if step % r["eval_every"] and step < settings.iterations:
                continue

            # Evaluation of G_ema: FID, IS and KID with the launch's protocol.
            scores = evaluator.evaluate(
                lambda k: retrain.sample(k), launch["metrics"]["n_generated"]
            )
            check_finite({k: scores[k] for k in ("fid", "is", "kid")}, step)
            _log_grid(run, retrain.sample(retrain.fixed_noise), step, folder)
            evaluation = {**finite(scores), "iteration": step}
            run.queue_metrics(evaluation, step)
            run.flush_metrics()
            metrics = {**losses, **evaluation}
            metrics |= {
                "protocol": json.dumps(scores["protocol"]),
                "mlflow_run_id": run.run_id,
                "device_seconds": elapsed + time.monotonic() - started,
                "device": str(device),
                "node_id": node_id(),
                "generator_parameters": counts["generator"],
                "completed": retrain.done,
            }

            def state() -> dict:
                return {
                    "retrain": retrain.state_dict(),
                    "stream": stream.state_dict(),
                    "elapsed": elapsed + time.monotonic() - started,
                    "run_id": run.run_id,
                }

            report(metrics, state if schedule.due(metrics["completed"]) else None)
        final = Path(folder) / "final.pt"
        save_checkpoint(final, retrain.state_dict())
        run.log_artifact(final, "checkpoint")
        run.end("FINISHED")
    except NonFiniteLossError as error:
        end_non_finite(run, "retrain", error)
    except BaseException:
        run.end("FAILED")
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
