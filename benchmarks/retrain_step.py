"""Measure the throughput of the retrain training step at two image shapes.

Retrains the published AdversarialNAS CIFAR-10 generator genotype against the fixed AutoGAN
discriminator at the digits shape (16 px, 1 channel) and the CIFAR-10 shape (32 px, 3 channels).
Widths, batch sizes and n_critic come from the composed experiments/ config (exp=digits and
exp=cifar10 with the chosen budget), so the numbers match what a launch of that budget runs.
Real images are random values in [-1, 1] already on the device, so data loading is not timed.

Prints one JSON object per shape to stdout; progress goes to stderr. Example:

    OMP_NUM_THREADS=1 python benchmarks/retrain_step.py --budget smoke --cycles 10
    python benchmarks/retrain_step.py --budget paper --device cuda retrain.batch_size=64
"""

import argparse
import json
import logging
import sys
import time

import torch

from anas.allocator import keep_freed_memory
from anas.genotypes import load_shipped
from anas.retrain import Retrain, RetrainSettings
from runner.config import compose

log = logging.getLogger("benchmarks.retrain_step")

SHAPES = ("digits", "cifar10")  # experiment files under experiments/exp/
GENOTYPE = "adversarialnas-cifar10"


class DeviceStream:
    """Random images in [-1, 1], drawn once on the device and handed out in turn."""

    def __init__(self, count: int, channels: int, size: int, device: torch.device):
        rng = torch.Generator(device=device).manual_seed(0)
        shape = (count, channels, size, size)
        self.images = torch.rand(shape, generator=rng, device=device) * 2 - 1
        self.position = 0

    def next(self, n: int) -> torch.Tensor:
        if self.position + n > len(self.images):
            self.position = 0
        batch = self.images[self.position : self.position + n]  # (n, C, H, W)
        self.position += n
        return batch


def measure(shape: str, args: argparse.Namespace) -> dict:
    """Time `args.cycles` full n_critic cycles after `args.warmup_cycles` untimed ones."""
    config = compose([f"exp={shape}", f"budget={args.budget}", *args.overrides])
    settings = RetrainSettings.from_config(config)
    device = torch.device(args.device)
    seed = config["retrain"]["seeds"][0]
    retrain = Retrain(settings, load_shipped(GENOTYPE), "autogan", device, seed)
    stream = DeviceStream(4 * settings.batch_size, settings.img_channels, settings.img_size, device)

    log.info("%s: %s on %s, warming up", shape, settings, device)
    for _ in range(args.warmup_cycles * settings.n_critic):
        retrain.step(stream)
    _synchronize(device)
    start = time.perf_counter()
    steps = args.cycles * settings.n_critic
    for _ in range(steps):
        retrain.step(stream)
    _synchronize(device)
    seconds = time.perf_counter() - start
    log.info("%s: %d discriminator steps in %.2f s", shape, steps, seconds)

    real_images = steps * settings.batch_size
    generated_images = steps * settings.batch_size + args.cycles * settings.gen_batch_size
    return {
        "shape": shape,
        "budget": args.budget,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "img_size": settings.img_size,
        "img_channels": settings.img_channels,
        "g_channels": settings.g_channels,
        "d_channels": settings.d_channels,
        "batch_size": settings.batch_size,
        "gen_batch_size": settings.gen_batch_size,
        "n_critic": settings.n_critic,
        "parameters": retrain.parameter_counts(),
        "discriminator_steps": steps,
        "seconds": round(seconds, 4),
        # Real images through the discriminator per second; the generator step is inside the time.
        "images_per_second": round(real_images / seconds, 2),
        "generated_images_per_second": round(generated_images / seconds, 2),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="smoke", help="budget file of experiments/budget/")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--cycles", type=int, default=10, help="timed n_critic cycles per shape")
    parser.add_argument(
        "--warmup-cycles", type=int, default=2, help="untimed n_critic cycles before timing"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--shape", choices=SHAPES, action="append", help="shape to measure (default: both)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the config, e.g. retrain.batch_size=64"
    )
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.warmup_cycles < 0:
        parser.error("--cycles must be at least 1 and --warmup-cycles at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the runner's trials do
    for shape in args.shape or SHAPES:
        print(json.dumps(measure(shape, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
