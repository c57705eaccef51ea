"""Time one full search iteration: the project's supernet against the straightforward one.

    python benchmarks/search_step.py [--rounds 5] [--threads 2] [--device cpu]

Both run Algorithm 1 of AdversarialNAS (updates of beta, D's weights, alpha and G's weights)
from the same seed on the same supernet parameters:

  straightforward  every candidate operation runs separately and its output is summed with its
                   weight (anas.networks.MixedEdge), in NCHW layout, and the iteration is
                   written as the research code writes it: D called once on real and once on
                   fake images, loss.backward() through everything, per-parameter Adam, spectral
                   normalisation recomputed at every forward pass (see `reference_step`)
  project          anas.search.Search.step as the runner uses it: merged kernels (anas.fused)
                   packed and mixed once per update for the whole network, with one batched
                   spectral normalisation; stride-2 dilated and small dilated convolutions
                   rewritten as undilated ones; channels-last layout; one D pass over real and
                   fake images; gradients of the updated group only; fused Adam

Two more rows separate the causes: "supernet only" runs Search.step with MixedEdge in NCHW, and
"merged, NCHW" runs it with the merged kernels but without channels-last layout.

torch.compile (inductor, torch 2.14.1) is not used: on the digits shape it took 669 s to compile
G's and D's forward passes and then ran a search step in 0.66 s against 0.51 s eager (one
thread, a loaded machine).

Shapes are those of the real configs: the embedded default (exp=digits budget=smoke) and
CIFAR-10 smoke (exp=cifar10 budget=smoke). Timing alternates the variants round by round and
keeps the median, so a load that comes and goes on the machine hits both alike; each round runs
one untimed iteration of a variant before timing it, so no variant pays for reloading the
caches after another. FLOPs are those of the straightforward formulation
(torch.utils.flop_counter), so "achieved GFLOP/s" is the work the straightforward step does
divided by the project's time; the peak is the best GFLOP/s of one large convolution on this
machine. Progress goes to stderr; results to stdout,
ending with `speedup_min=<X.XX>`, the smaller of the two speed-ups.
"""

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anas.allocator import keep_freed_memory  # noqa: E402
from anas.search import Search, SearchSettings  # noqa: E402
from runner.config import compose  # noqa: E402

SHAPES = {
    "digits smoke (16 px, 1 channel)": ["exp=digits", "budget=smoke"],
    "cifar10 smoke (32 px, 3 channels)": ["exp=cifar10", "budget=smoke"],
}

VARIANTS = {
    "straightforward": {"fused": False, "channels_last": False},
    "supernet only": {"fused": False, "channels_last": False},
    "merged, NCHW": {"fused": True, "channels_last": False},
    "project": {"fused": True, "channels_last": True},
}


def reference_step(search: Search, stream, optimizers: dict) -> None:
    """Run one iteration of Algorithm 1 the plain way, on a Search built with fused=False."""
    s, G, D, loss = search.settings, search.G, search.D, search.loss
    m = s.batch_size
    nets = (G, D)

    def update(value: torch.Tensor, optimizer) -> None:
        for net in nets:
            net.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    for _ in range(s.n_critic):
        real = stream.next(2 * m)
        z = search._randn(2 * m)
        g_w = search._weights(G)
        with torch.no_grad():
            fake = G(z, g_w)
        update(
            loss.d_loss(D(real[:m], search._weights(D)), D(fake[:m], search._weights(D))),
            optimizers["beta"],
        )
        w = [{k: v.detach() for k, v in cell.items()} for cell in search._weights(D)]
        update(loss.d_loss(D(real[m:], w), D(fake[m:], w)), optimizers["D"])
    z = search._randn(2 * m)
    d_w = [{k: v.detach() for k, v in cell.items()} for cell in search._weights(D)]
    update(loss.g_loss(D(G(z[:m], search._weights(G)), d_w)), optimizers["alpha"])
    g_w = [{k: v.detach() for k, v in cell.items()} for cell in search._weights(G)]
    update(loss.g_loss(D(G(z[m:], g_w), d_w)), optimizers["G"])
    search.iteration += 1


def plain_optimizers(search: Search) -> dict:
    """Adam with the search's hyperparameters, one parameter at a time (PyTorch's CPU default)."""
    out = {}
    for name, fused in (
        ("alpha", search.opt_alpha),
        ("beta", search.opt_beta),
        ("G", search.opt_G),
        ("D", search.opt_D),
    ):
        group = fused.param_groups[0]
        out[name] = torch.optim.Adam(
            group["params"],
            lr=group["lr"],
            betas=group["betas"],
            weight_decay=group["weight_decay"],
            foreach=False,
        )
    return out


class RandomStream:
    """Real-image stand-in: the step's cost does not depend on pixel values."""

    def __init__(self, settings: SearchSettings, device):
        self.shape = (settings.img_channels, settings.img_size, settings.img_size)
        self.rng = torch.Generator().manual_seed(0)
        self.device = device

    def next(self, n: int) -> torch.Tensor:
        return (torch.rand((n, *self.shape), generator=self.rng) * 2 - 1).to(self.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, device, autocast: bool, warmup: int = 1) -> float:
    """Seconds per iteration of `step()` over `steps` iterations, after `warmup` untimed ones
    that bring this variant's tensors back into the caches the previous variant used."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(warmup):
            step()
    synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(steps):
            step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


class FlopCount(TorchDispatchMode):
    """Counts FLOPs of every ATen call that torch's FLOP formulas cover (convolutions, their
    backward, matrix products). torch.utils.flop_counter.FlopCounterMode would do the same, but
    its module hooks do not work under torch.autograd.grad, which the search step uses."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(settings: SearchSettings, device) -> int:
    search = Search(settings, device, seed=0, **VARIANTS["straightforward"])
    with FlopCount() as counter:
        search.step(RandomStream(settings, device))
    return counter.total


def conv_peak(device, rounds: int = 5) -> float:
    """Best GFLOP/s of a large 3x3 convolution, forward only."""
    x = torch.randn(64, 128, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    flops = 2 * 64 * 128 * 128 * 9 * 32 * 32
    F.conv2d(x, w, padding=1)
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        F.conv2d(x, w, padding=1)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=2, help="iterations per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument("--batch-size", type=int, help="override search.batch_size (m)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the runner's trials do
    device = torch.device(args.device)

    peak = conv_peak(device)
    print(f"device={device} threads={args.threads} bf16={args.bf16}")
    print(f"conv_peak_gflops={peak:.1f}")
    speedups = []
    for label, overrides in SHAPES.items():
        extra = [f"search.batch_size={args.batch_size}"] if args.batch_size else []
        settings = SearchSettings.from_config(compose(overrides + extra))
        print(f"[{label}] counting FLOPs", file=sys.stderr)
        flops = count_flops(settings, device)
        searches = {
            name: Search(settings, device, seed=0, **options) for name, options in VARIANTS.items()
        }
        streams = {name: RandomStream(settings, device) for name in VARIANTS}
        reference_optimizers = plain_optimizers(searches["straightforward"])
        steps = {name: partial(search.step, streams[name]) for name, search in searches.items()}
        steps["straightforward"] = partial(
            reference_step,
            searches["straightforward"],
            streams["straightforward"],
            reference_optimizers,
        )
        for step in steps.values():  # warm-up: allocations, kernel selection
            time_steps(step, 1, device, args.bf16)
        times = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            print(f"[{label}] round {round_ + 1}/{args.rounds}", file=sys.stderr)
            for name, step in steps.items():
                times[name].append(time_steps(step, args.steps, device, args.bf16))
        seconds = {name: statistics.median(values) for name, values in times.items()}
        speedup = seconds["straightforward"] / seconds["project"]
        speedups.append(speedup)
        achieved = flops / seconds["project"] / 1e9
        print(
            f"{label}: batch m={settings.batch_size} n_critic={settings.n_critic} "
            f"widths G={settings.g_channels} D={settings.d_channels}\n"
            f"  straightforward {seconds['straightforward']:.4f} s/iter\n"
            f"  supernet only   {seconds['supernet only']:.4f} s/iter "
            f"(Search.step, MixedEdge, NCHW)\n"
            f"  merged, NCHW    {seconds['merged, NCHW']:.4f} s/iter\n"
            f"  project         {seconds['project']:.4f} s/iter\n"
            f"  speedup={speedup:.2f} (merged kernels alone: "
            f"{seconds['supernet only'] / seconds['project']:.2f})  "
            f"flops/iter={flops / 1e9:.2f} G  "
            f"achieved={achieved:.1f} GFLOP/s ({achieved / peak:.1%} of conv peak)"
        )
    print(f"speedup_min={min(speedups):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
