"""The adversarial architecture search: AdversarialNAS's Algorithm 1 on the two supernets.

One `step` is one iteration of the algorithm:

    n_critic times:
        sample 2m real images and 2m noise vectors
        beta  <- descend d_loss on the first m  (the discriminator ascends its objective)
        w_D   <- descend d_loss on the other m
    sample 2m noise vectors
    alpha <- descend g_loss on the first m
    w_G   <- descend g_loss on the other m

Each update differentiates its loss with respect to its own parameter group only
(torch.autograd.grad), so a weight step never moves alpha or beta, an architecture step never
moves a network weight, and no stale gradients pile up in the other groups.
"""

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from anas.errors import NonFiniteLossError
from anas.genotypes import Genotype, derive
from anas.losses import LOSSES
from anas.networks import (
    Discriminator,
    Generator,
    arch_parameters,
    arch_tables,
    init_weights,
    mixing_weights,
    weight_parameters,
)


@dataclass
class SearchSettings:
    latent_dim: int  # length of the noise vector, split evenly across the generator's 3 cells
    g_channels: int  # channels of every generator cell
    d_channels: int  # channels of every discriminator cell
    img_size: int  # image width and height in pixels, a multiple of 8 from 16 up
    img_channels: int  # 1 or 3
    batch_size: int  # m: each update uses m samples, so an iteration draws 2m per phase
    n_critic: int  # discriminator phases per generator phase
    iterations: int  # length of the search, used by the temperature schedule
    loss: str  # a name in anas.losses.LOSSES
    arch_lr: float  # Adam learning rate of alpha and beta
    arch_betas: tuple[float, float]
    arch_weight_decay: float
    g_lr: float  # Adam learning rate of the generator's weights
    d_lr: float  # Adam learning rate of the discriminator's weights
    betas: tuple[float, float]  # Adam betas of both networks' weights
    gumbel: bool  # mix edges by Gumbel-softmax samples instead of a plain softmax
    tau_max: float  # Gumbel temperature at the first iteration, annealed linearly ...
    tau_min: float  # ... to this one at the last

    @classmethod
    def from_config(cls, config: Mapping, sampled: Mapping | None = None) -> "SearchSettings":
        """Read the settings from a composed config (a plain nested dict); `sampled` contains
        values drawn for this trial that replace keys of the `search` section."""
        search = {**config["search"], **(sampled or {})}
        model, data = config["model"], config["data"]
        values = {name: search[name] for name in SEARCH_KEYS}
        return cls(
            latent_dim=model["latent_dim"],
            g_channels=model["g_channels"],
            d_channels=model["d_channels"],
            img_size=data["img_size"],
            img_channels=data["channels"],
            **values
            | {
                "n_critic": int(values["n_critic"]),
                "arch_betas": tuple(values["arch_betas"]),
                "betas": tuple(values["betas"]),
            },
        )


# Fields read from the config's `search` section under the same name.
SEARCH_KEYS = (
    "batch_size",
    "n_critic",
    "iterations",
    "loss",
    "arch_lr",
    "arch_betas",
    "arch_weight_decay",
    "g_lr",
    "d_lr",
    "betas",
    "gumbel",
    "tau_max",
    "tau_min",
)


def detached(weights: list[dict]) -> list[dict]:
    return [{k: v.detach() for k, v in cell.items()} for cell in weights]


@contextlib.contextmanager
def weights_once(net: torch.nn.Module, grad: bool):
    """Compute `net`'s spectrally normalised weights, and a fused supernet's packed kernels
    (anas.fused.MergedConvs.pack), once for the block instead of at every forward pass.

    Each spectral normalisation runs one power iteration, so this also sets how often the
    estimate of the largest singular value moves: once per update instead of once per forward
    pass. With `grad` False the weights are built without a graph, for updates that treat
    `net`'s weights as constants.
    """
    merged = net.merged if getattr(net, "fused", False) else None
    packed_layers = {id(m) for m in merged.spectral_norm_modules()} if merged else set()
    with parametrize.cached():
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for module in net.modules():
                if id(module) in packed_layers:
                    continue
                if parametrize.is_parametrized(module, "weight"):
                    module.weight  # noqa: B018 (fills the cache)
            if merged is not None:
                merged.frozen = merged.pack()
        try:
            yield
        finally:
            if merged is not None:
                merged.frozen = None


class Search:
    """Both supernets, their four optimizers and the noise generator of one search trial."""

    def __init__(
        self,
        settings: SearchSettings,
        device: torch.device | str,
        seed: int,
        fused: bool = True,
        channels_last: bool = True,
    ):
        """`fused` False runs every candidate operation separately (the reference formulation);
        `channels_last` stores images and kernels as (batch, height, width, channels), which
        ran 2-10% faster on a 2-core CPU (benchmarks/search_step.py)."""
        self.settings = s = settings
        self.device = torch.device(device)
        self.loss = LOSSES.get(s.loss, key="search.loss")
        # Initialise from the seed without touching the process's global random state.
        init_rng = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.G = Generator(s.latent_dim, s.g_channels, s.img_size, s.img_channels)
            self.D = Discriminator(s.d_channels, s.img_size, s.img_channels)
        init_weights(self.G, init_rng)
        init_weights(self.D, init_rng)
        self.G.fused = self.G.fused and fused
        self.D.fused = self.D.fused and fused
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.G.to(self.device, memory_format=self.memory_format)
        self.D.to(self.device, memory_format=self.memory_format)
        self.noise = torch.Generator(device=self.device).manual_seed(seed)
        # fused=True: one kernel updates every tensor of the group; the supernet has hundreds of
        # small tensors, where the per-tensor loop costs more than the arithmetic.
        arch = {"lr": s.arch_lr, "betas": tuple(s.arch_betas), "weight_decay": s.arch_weight_decay}
        adam = {"betas": tuple(s.betas), "fused": True}
        self.opt_alpha = torch.optim.Adam(arch_parameters(self.G), **arch, fused=True)
        self.opt_beta = torch.optim.Adam(arch_parameters(self.D), **arch, fused=True)
        self.opt_G = torch.optim.Adam(weight_parameters(self.G), lr=s.g_lr, **adam)
        self.opt_D = torch.optim.Adam(weight_parameters(self.D), lr=s.d_lr, **adam)
        self.iteration = 0

    # Temperature and mixing weights

    def tau(self) -> float | None:
        """Gumbel temperature of the current iteration, or None without Gumbel-softmax."""
        s = self.settings
        if not s.gumbel:
            return None
        progress = min(1.0, self.iteration / max(1, s.iterations - 1))
        return s.tau_max - (s.tau_max - s.tau_min) * progress

    def _weights(self, net) -> list[dict]:
        arch = net.alpha if net is self.G else net.beta
        return mixing_weights(arch, net.network, self.tau(), self.noise)

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=self.memory_format)

    def _randn(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.settings.latent_dim, generator=self.noise, device=self.device)

    def _update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, name: str) -> float:
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{name} is {value} at search iteration {self.iteration}")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        return value

    # One iteration of the algorithm

    def _discriminate(self, real, fake, weights, kernels):
        """D on real and fake images in one batch, logits (m,) each.

        D has no batch statistics, so one forward over both halves equals two separate ones.
        """
        logits = self.D(torch.cat([real, fake]), weights, kernels)  # (2m,)
        return logits.split([len(real), len(fake)])

    def step(self, stream) -> dict[str, float]:
        """Run one search iteration; `stream.next(n)` gives n real images in [-1, 1]."""
        m = self.settings.batch_size
        G, D = self.G, self.D
        # G's weights stay fixed until its own weight update, so one packing of its kernels
        # serves every fake batch of the critic steps and the alpha update.
        with torch.no_grad():
            g_packed = G.pack()

        def generate(z, weights):
            return G(z, weights, G.merged_kernels(weights, g_packed))

        for _ in range(self.settings.n_critic):
            real = self._layout(stream.next(2 * m).to(self.device))  # (2m, C, H, W)
            with torch.no_grad():
                fake = generate(self._randn(2 * m), self._weights(G))  # (2m, C, H, W)

            # beta: the discriminator's architecture, on the first half. D's weights are
            # constants here, so their spectral normalisation runs once, without a graph.
            w = self._weights(D)
            with weights_once(D, grad=False):
                kernels = D.merged_kernels(w)
                loss = self.loss.d_loss(*self._discriminate(real[:m], fake[:m], w, kernels))
            d_arch = self._update(loss, self.opt_beta, "discriminator architecture loss")

            # The discriminator's weights, on the other half.
            w = detached(self._weights(D))
            with weights_once(D, grad=True):
                kernels = D.merged_kernels(w)
                loss = self.loss.d_loss(*self._discriminate(real[m:], fake[m:], w, kernels))
            d_loss = self._update(loss, self.opt_D, "discriminator loss")

        z = self._randn(2 * m)
        d_weights = detached(self._weights(D))
        # Both generator updates see D as a constant function of its input, so they share its
        # kernels, built once without a graph.
        with weights_once(D, grad=False):
            with torch.no_grad():
                d_kernels = D.merged_kernels(d_weights)
            # alpha: the generator's architecture, on the first half.
            loss = self.loss.g_loss(D(generate(z[:m], self._weights(G)), d_weights, d_kernels))
            g_arch = self._update(loss, self.opt_alpha, "generator architecture loss")

            # The generator's weights, on the other half; G packs its kernels with a graph.
            loss = self.loss.g_loss(D(G(z[m:], detached(self._weights(G))), d_weights, d_kernels))
            g_loss = self._update(loss, self.opt_G, "generator loss")

        metrics = {"d_arch_loss": d_arch, "d_loss": d_loss, "g_arch_loss": g_arch, "g_loss": g_loss}
        if self.settings.gumbel:
            metrics["tau"] = self.tau()  # the temperature this iteration used
        self.iteration += 1
        return metrics

    # What the search has found so far

    def genotypes(self) -> tuple[Genotype, Genotype]:
        size = self.settings.img_size
        return (
            derive("generator", size, arch_tables(self.G.alpha, "generator")),
            derive("discriminator", size, arch_tables(self.D.beta, "discriminator")),
        )

    @torch.no_grad()
    def edge_weights(self) -> dict[str, list[dict[str, list[float]]]]:
        """Softmax weights per network, cell and edge: {network: [{edge: [p per op]}]}."""
        result = {}
        for net, arch in ((self.G, self.G.alpha), (self.D, self.D.beta)):
            cells = []
            for cell, weights in zip(net.cells, mixing_weights(arch, net.network), strict=True):
                rows = cell.rows.items()
                cells.append({edge: weights[group][row].tolist() for edge, (group, row) in rows})
            result[net.network] = cells
        return result

    @torch.no_grad()
    def entropy(self) -> dict[str, float]:
        """Mean entropy (nats) of the per-edge softmax of alpha and of beta."""
        out = {}
        for name, net, arch in (("alpha", self.G, self.G.alpha), ("beta", self.D, self.D.beta)):
            total, edges = 0.0, 0
            for cell in mixing_weights(arch, net.network):
                for p in cell.values():
                    total += float(-(p * p.clamp_min(1e-12).log()).sum())
                    edges += p.shape[0]
            out[f"{name}_entropy"] = total / edges
        return out

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n images from the supernet generator in eval mode, from a noise generator of their
        own, so sampling never shifts the search's random stream."""
        rng = torch.Generator(device=self.device).manual_seed(seed)
        z = torch.randn(n, self.settings.latent_dim, generator=rng, device=self.device)
        self.G.eval()
        try:
            return self.G(z)
        finally:
            self.G.train()

    # Checkpoints hold tensors, numbers and strings only.

    def state_dict(self) -> dict:
        return {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_alpha": self.opt_alpha.state_dict(),
            "opt_beta": self.opt_beta.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "noise": self.noise.get_state(),
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        for name in ("opt_alpha", "opt_beta", "opt_G", "opt_D"):
            getattr(self, name).load_state_dict(state[name])
        self.noise.set_state(state["noise"])
        self.iteration = int(state["iteration"])
