"""Runner overhead: the search stage through Ray Tune and MLflow against a plain loop.

    python benchmarks/runner_overhead.py [--seconds 20 | --iterations N]

The Tune side is the launcher's own search stage, `runner.stages.run_search_stage`, under an
MLflow parent run from `runner.tracking.Tracker` and a Ray started by `runner.cluster.connect`,
at the embedded default's sizes (exp=digits budget=smoke). `search.iterations` is calibrated so
that the plain loop takes about --seconds, or set with --iterations to compare runs at the same
number of evaluations. The trials are `runner.trials.search_trial`: they log every iteration's
losses to MLflow and, every `search.eval_every` iterations, evaluate FID, report to Tune (with a
checkpoint at the first and last report and every `tune.checkpoint_interval_s` seconds) and log
genotypes, cell diagrams and a sample grid.

The plain loop (benchmarks/plain_search.py) is the same trial without Ray, MLflow, checkpoints
or pictures: the configuration that the stage's Optuna searcher samples first, the same data
stream, search steps and FID evaluations, in this process (where torch is already imported).
Everything the Tune side spends beyond it counts as overhead. Printed (stdout):

  overhead per trial   wall time of a search stage of one trial minus the plain loop's time,
                       and that difference as a share of a one-minute trial; each time is the
                       shorter of two runs, one before the other stages and one after them
  new process          the same against the plain loop run as a new Python process, whose time
                       includes starting the interpreter and importing torch, torch-fidelity
                       and the project, as a script without Ray would
  amortised overhead   the same for a stage of 2 trials run one after the other (one slot),
                       per trial
  concurrency          wall time of that stage over the same 2 trials side by side, each with
                       1 CPU and 1 torch thread (tune.max_concurrent=2), and the CPU time the
                       launching process (Tune's controller) used during each stage

Starting Ray is paid once per launch and is printed separately. Figures depend on the machine
and its load; run it twice and compare.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from plain_search import plain_search  # noqa: E402

from anas.metrics import Evaluator  # noqa: E402
from runner import cluster  # noqa: E402
from runner.config import compose  # noqa: E402
from runner.launch import check_data  # noqa: E402
from runner.stages import SeededSearch, run_search_stage  # noqa: E402
from runner.tracking import Tracker, resolve_tracking_uri  # noqa: E402
from runner.trials import trial_device  # noqa: E402

ONE_MINUTE = 60.0


def first_configuration(cfg: dict) -> dict:
    """Return the hyperparameters the search stage's searcher gives its first trial."""
    s = cfg["search"]
    searcher = SeededSearch(s["space"], s["seeds"], s["seeds"][0], "fid", "min")
    searcher.set_search_properties("fid", "min", {})
    sampled = searcher.suggest("plain")
    return {key: value for key, value in sampled.items() if key != "seed"}


def plain_process(cfg: dict, sampled: dict, seed: int) -> float:
    """Run `plain_search` as a new Python process; return its wall time, start-up included."""
    arguments = json.dumps({"cfg": cfg, "sampled": sampled, "seed": seed})
    script = Path(__file__).with_name("plain_search.py")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(script), arguments], check=True)
    return time.perf_counter() - start


def stage(base: list[str], tmp: str, name: str, seeds: list[int], concurrent: int) -> dict:
    """Compose the config of one search stage with its own output_dir."""
    return compose(
        [
            *base,
            f"output_dir={tmp}/{name}",
            f"search.seeds=[{','.join(map(str, seeds))}]",
            f"tune.max_concurrent={concurrent}",
        ]
    )


DRIVER_CPU: dict[str, float] = {}  # stage name -> CPU seconds of this process during it


def run_stage(cfg: dict, tracking: dict) -> float:
    """Run one search stage; return its wall time and record this process's CPU time."""
    resources = {"cpu": cfg["resources"]["cpu"], "gpu": cfg["resources"]["gpu"]}
    cpu = time.process_time()
    start = time.perf_counter()
    rows = run_search_stage(cfg, tracking, resources)
    elapsed = time.perf_counter() - start
    DRIVER_CPU[Path(cfg["output_dir"]).name] = time.process_time() - cpu
    failed = [row["failure"] for row in rows if row["failure"]]
    if failed:
        raise RuntimeError(f"search trials failed: {failed}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="plain-loop length of a trial")
    parser.add_argument(
        "--iterations", type=int, help="search iterations per trial, instead of calibrating"
    )
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        # cache_dir stays the config's, relative to the current directory as for
        # `python runner/launch.py`, so decoded data, the feature extractor and reference
        # statistics are reused across runs.
        base = ["exp=digits", "budget=smoke", f"output_root={tmp}/outputs", "search.num_samples=1"]
        cfg = stage(base, tmp, "calibration", [0], 1)
        check_data(cfg)
        Evaluator.from_config(cfg, trial_device(cfg)).reference()  # fills the caches before timing
        sampled = first_configuration(cfg)

        # Calibrate the trial length on the plain loop, evaluations included: the difference
        # of two lengths leaves out the set-up.
        every = cfg["search"]["eval_every"]
        iterations = args.iterations
        if iterations is None:
            short, long = (plain_search(cfg, sampled, 0, k * every) for k in (1, 2))
            per_iteration = max(long - short, 1e-3) / every
            iterations = max(every, round((args.seconds - (2 * short - long)) / per_iteration))
        base.append(f"search.iterations={iterations}")
        cfg = stage(base, tmp, "plain", [0], 1)
        print(f"trial: {iterations} search iterations, configuration {sampled}")
        # The plain loop runs once before and once after the stages, and each figure uses the
        # faster of two runs: the one that other processes on the machine disturbed less.
        plain = [plain_search(cfg, sampled, 0)]
        fresh = [plain_process(cfg, sampled, 0)]

        uri = resolve_tracking_uri(cfg)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        start = time.perf_counter()
        started_ray = cluster.connect(cfg, uri)
        print(f"ray start: {time.perf_counter() - start:.2f} s (once per launch)")
        try:
            with Tracker.start(cfg) as tracker:
                tracking = dict(tracker.handle)
                # Optuna's sampler is seeded with the first search seed, so every stage here
                # starts with seed 0 and samples the configuration of the plain loop.
                single = [run_stage(stage(base, tmp, "single", [0], 1), tracking)]
                sequential = run_stage(stage(base, tmp, "sequential", [0, 1], 1), tracking)
                concurrent = run_stage(stage(base, tmp, "concurrent", [0, 1], 2), tracking)
                single.append(run_stage(stage(base, tmp, "single_again", [0], 1), tracking))
        finally:
            if started_ray:
                ray.shutdown()
        plain.append(plain_search(cfg, sampled, 1))  # the same configuration, at the same cost
        fresh.append(plain_process(cfg, sampled, 1))

    print(f"plain loop: {plain[0]:.2f} s (seed 0, before), {plain[1]:.2f} s (seed 1, after)")
    overhead = min(single) - min(plain)
    amortised = sequential / 2 - min(plain)
    against_process = min(single) - min(fresh)
    print(f"plain loop, new process: {fresh[0]:.2f} s (before), {fresh[1]:.2f} s (after)")
    print(f"search stage, 1 trial (seed 0): {single[0]:.2f} s, again {single[1]:.2f} s")
    print(
        f"overhead per trial: {overhead:.2f} s = {overhead / ONE_MINUTE:.1%} of a one-minute trial"
    )
    print(
        f"overhead per trial against a new process: {against_process:.2f} s = "
        f"{against_process / ONE_MINUTE:.1%} of a one-minute trial"
    )
    print(
        f"amortised overhead per trial (2 trials, one slot): {amortised:.2f} s = "
        f"{amortised / ONE_MINUTE:.1%} of a one-minute trial"
    )
    print(f"2 trials sequential: {sequential:.2f} s, concurrent: {concurrent:.2f} s")
    used = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in DRIVER_CPU.items())
    print(f"CPU time of the driver process during each stage: {used}")
    print(f"concurrency_speedup={sequential / concurrent:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
