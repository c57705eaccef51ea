"""Runner overhead: the same short search trial through Ray Tune with MLflow and in a plain loop.

    python benchmarks/runner_overhead.py [--seconds 20]

The trial is the embedded default's search step (exp=digits budget=smoke) repeated for a fixed
number of iterations, calibrated so the plain loop takes about --seconds. Through the runner it
also reports to Tune and checkpoints every `search.eval_every` iterations, and logs its losses
at every iteration to an MLflow child run in a temporary SQLite store, as the real search trial
does. Printed (stdout):

  overhead per trial   Tune wall time of one trial run alone, minus the plain loop's time, and
                       that difference as a share of a one-minute trial
  concurrency          wall time of 2 trials one after the other over 2 trials side by side,
                       each with 1 CPU and 1 torch thread, through the same Tuner

Starting Ray is paid once per launch and is printed separately.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from anas.search import Search, SearchSettings  # noqa: E402
from runner.config import compose  # noqa: E402
from runner.tracking import Tracker, TrialRun  # noqa: E402
from runner.trials import report  # noqa: E402

ONE_MINUTE = 60.0


class RandomStream:
    def __init__(self, settings: SearchSettings, seed: int):
        self.shape = (settings.img_channels, settings.img_size, settings.img_size)
        self.rng = torch.Generator().manual_seed(seed)

    def next(self, n: int) -> torch.Tensor:
        return torch.rand((n, *self.shape), generator=self.rng) * 2 - 1


def plain_loop(settings: SearchSettings, iterations: int, seed: int = 0) -> float:
    torch.set_num_threads(1)
    start = time.perf_counter()
    search, stream = Search(settings, "cpu", seed), RandomStream(settings, seed)
    for _ in range(iterations):
        search.step(stream)
    return time.perf_counter() - start


def tune_trial(config: dict, settings: SearchSettings, tracking: dict, report_every: int) -> None:
    torch.set_num_threads(1)
    seed = config["seed"]
    search, stream = Search(settings, "cpu", seed), RandomStream(settings, seed)
    context = tune.get_context()
    run = TrialRun.open(
        tracking, "search", context.get_trial_name(), context.get_trial_id(), {"seed": seed}
    )
    for _ in range(config["iterations"]):
        losses = search.step(stream)
        run.log_metrics(losses, search.iteration)
        if search.iteration % report_every == 0:
            report({**losses, "completed": False}, {"search": search.state_dict()})
    report({"completed": True}, {"search": search.state_dict()})
    run.end("FINISHED")


def run_tuner(settings, tracking, iterations, seeds, concurrent, storage, report_every) -> float:
    trainable = tune.with_resources(
        tune.with_parameters(
            tune_trial, settings=settings, tracking=tracking, report_every=report_every
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"seed": tune.grid_search(seeds), "iterations": iterations},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    elapsed = time.perf_counter() - start
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"trials failed: {errors}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="plain-loop length of a trial")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["exp=digits", "budget=smoke", f"output_root={tmp}/outputs"], base_dir=tmp)
        settings = SearchSettings.from_config(cfg)
        report_every = cfg["search"]["eval_every"]

        # Calibrate the trial length on the plain loop.
        per_iteration = plain_loop(settings, 3) / 3
        iterations = max(report_every, round(args.seconds / per_iteration))
        plain = plain_loop(settings, iterations)
        print(f"trial: {iterations} search iterations, plain loop {plain:.2f} s")

        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        print(f"ray start: {time.perf_counter() - start:.2f} s (once per launch)")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/outputs/mlflow.db"
        try:
            with Tracker.start(cfg) as tracker:
                tracking = dict(tracker.handle)
                common = (settings, tracking, iterations)
                one = run_tuner(*common, [0], 1, f"{tmp}/one", report_every)
                sequential = run_tuner(*common, [0, 1], 1, f"{tmp}/seq", report_every)
                concurrent = run_tuner(*common, [0, 1], 2, f"{tmp}/conc", report_every)
        finally:
            ray.shutdown()

    overhead = one - plain
    print(f"tune + mlflow, 1 trial: {one:.2f} s")
    print(
        f"overhead per trial: {overhead:.2f} s = {overhead / ONE_MINUTE:.1%} of a one-minute trial"
    )
    print(f"2 trials sequential: {sequential:.2f} s, concurrent: {concurrent:.2f} s")
    print(f"concurrency_speedup={sequential / concurrent:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
