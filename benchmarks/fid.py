"""Measure generated images per second through the FID path, and the reference-statistics cache.

Builds an `anas.metrics.Evaluator` from the composed experiments/ config (data, cache_dir and
metrics of the chosen experiment and budget) and evaluates twice, each time with a new
Evaluator as a new trial would. The first evaluation starts without cached reference
statistics (its cache file is removed unless --keep-reference), so it also reduces the real
images. The second one reads them from the cache. Generated images come either from uniform
noise or from a small untrained convolutional generator on the device.

Prints one JSON object per evaluation to stdout; progress goes to stderr. Example:

    OMP_NUM_THREADS=2 python benchmarks/fid.py --exp digits --budget smoke
    python benchmarks/fid.py --exp cifar10 --budget cpu --source network \\
        data.root=/data/cifar10-jpeg.zip --device cuda
"""

import argparse
import json
import logging
import sys
import time

import torch
import torch.nn as nn

from anas.metrics import Evaluator
from runner.config import compose

log = logging.getLogger("benchmarks.fid")


class SmallGenerator(nn.Module):
    """A DCGAN-like generator: z (B, latent_dim) -> images (B, C, S, S) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, img_size: int, img_channels: int):
        super().__init__()
        self.channels = channels
        self.start = img_size // 8
        self.project = nn.Linear(latent_dim, channels * self.start * self.start)
        layers: list[nn.Module] = []
        for _ in range(3):  # each block doubles H and W
            layers += [
                nn.Upsample(scale_factor=2),
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(channels, img_channels, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, self.channels, self.start, self.start)
        return self.body(x)


def make_sampler(source: str, config: dict, device: torch.device):
    """Return `sample(k)` drawing k images of the configured shape on `device`."""
    data = config["data"]
    shape = (data["channels"], data["img_size"], data["img_size"])
    generator = torch.Generator(device=device).manual_seed(0)
    if source == "random":
        return lambda k: torch.rand((k, *shape), generator=generator, device=device) * 2 - 1
    latent_dim = config["model"]["latent_dim"]
    torch.manual_seed(0)
    network = SmallGenerator(latent_dim, config["retrain"]["g_channels"], shape[1], shape[0])
    network = network.to(device).eval()

    @torch.no_grad()
    def sample(k: int) -> torch.Tensor:
        z = torch.randn((k, latent_dim), generator=generator, device=device)
        return network(z)

    return sample


def evaluate_once(config: dict, args: argparse.Namespace, label: str) -> dict:
    device = torch.device(args.device)
    data, metrics = config["data"], config["metrics"]
    n_generated = args.n_generated or metrics["n_generated"]

    start = time.perf_counter()
    evaluator = Evaluator(
        data,
        metrics["extractor"],
        data["split"],
        metrics["n_real"],
        config["cache_dir"],
        device,
        inception_weights=metrics["inception_weights"],
    )
    setup_seconds = time.perf_counter() - start
    if label == "first" and not args.keep_reference:
        removed = evaluator.reference_path()
        if removed.exists():
            log.info("removing cached reference statistics %s", removed)
            removed.unlink()

    sample = make_sampler(args.source, config, device)
    start = time.perf_counter()
    result = evaluator.evaluate(sample, n_generated, metrics=tuple(args.metrics))
    _synchronize(device)
    seconds = time.perf_counter() - start
    generated_seconds = seconds - evaluator.reference_seconds
    return {
        "evaluation": label,
        "protocol": result["protocol"]["tag"],
        "metrics": args.metrics,
        "source": args.source,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "reference_cache_hit": evaluator.reference_cache_hit,
        "setup_seconds": round(setup_seconds, 3),  # data, extractor weights and network
        "real_seconds": round(evaluator.reference_seconds, 3),  # reference statistics
        "generated_seconds": round(generated_seconds, 3),  # sampling, features and metrics
        "generated_images_per_second": round(n_generated / generated_seconds, 1),
        **{name: round(result[name], 4) for name in result if name != "protocol"},
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exp", default="digits", help="experiment file of experiments/exp/")
    parser.add_argument("--budget", default="smoke", help="budget file of experiments/budget/")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--source",
        choices=("random", "network"),
        default="random",
        help="generated images: uniform noise, or an untrained convolutional generator",
    )
    parser.add_argument(
        "--n-generated", type=int, help="generated images per evaluation (default: config)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=("fid", "is", "kid"),
        default=["fid"],
        help="metrics to compute (default: fid)",
    )
    parser.add_argument(
        "--keep-reference",
        action="store_true",
        help="keep cached reference statistics, so the first evaluation may hit the cache too",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the config, e.g. data.root=/data/cifar"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = compose([f"exp={args.exp}", f"budget={args.budget}", *args.overrides])
    for label in ("first", "second"):
        print(json.dumps(evaluate_once(config, args, label)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
