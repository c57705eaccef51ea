"""A search trial's steps and FID evaluations without Ray, MLflow, checkpoints or pictures.

    python benchmarks/plain_search.py CONFIG_JSON

`benchmarks/runner_overhead.py` times this loop in its own process and as a new Python process.
Run as a script, it imports only torch, torch-fidelity and `anas`, as a user's script that
searches without the runner would, and reads a JSON object with the composed launch config
("cfg"), the sampled hyperparameters ("sampled") and the seed ("seed").
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anas.allocator import keep_freed_memory  # noqa: E402
from anas.data import BatchStream, load_images  # noqa: E402
from anas.metrics import Evaluator  # noqa: E402
from anas.search import Search, SearchSettings  # noqa: E402


def plain_search(cfg: dict, sampled: dict, seed: int, iterations: int | None = None) -> float:
    """Run the search trial's steps and FID evaluations on the CPU; return seconds.

    `iterations` overrides `search.iterations` (used to time a few steps). Threads and the
    allocator are set as `runner.trials.trial_device` sets them.
    """
    start = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg["resources"]["cpu"])))
    keep_freed_memory()
    device = torch.device("cpu")
    settings = SearchSettings.from_config(cfg, sampled)
    total = iterations or settings.iterations
    stream = BatchStream(load_images(cfg["data"], "train", cfg["cache_dir"]), seed, device)
    search = Search(settings, device, seed)
    evaluator = Evaluator.from_config(cfg, device)
    n = cfg["metrics"]["search_n_generated"]
    while search.iteration < total:
        search.step(stream)
        step = search.iteration
        if step % cfg["search"]["eval_every"] and step < total:
            continue
        evaluator.evaluate(lambda k: search.sample(k, seed), n, metrics=("fid",))
        search.genotypes()
        search.entropy()
    return time.perf_counter() - start


if __name__ == "__main__":
    arguments = json.loads(sys.argv[1])
    plain_search(arguments["cfg"], arguments["sampled"], arguments["seed"])
