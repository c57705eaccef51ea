"""Training a derived architecture from scratch: the retrain stage of AdversarialNAS.

One `Retrain.step` is one discriminator update. Every `n_critic`-th step also updates the
generator, its moving average `G_ema` and both learning-rate schedules:

    real <- stream.next(batch_size), z ~ N(0, I) of shape (batch_size, latent_dim)
    w_D  <- Adam step on d_loss(D(real), D(G(z)))
    after every n_critic discriminator updates:
        z     ~ N(0, I) of shape (gen_batch_size, latent_dim)
        w_G   <- Adam step on g_loss(D(G(z)))
        G_ema <- ema_decay * G_ema + (1 - ema_decay) * G
        both learning rates move one step along their linear decay

Every random draw comes from torch generators that the object owns, seeded from `seed`, or
from the stream. A run restored from `state_dict()`, with the stream restored from its own
state, therefore continues bit for bit on the CPU. On CUDA, cuDNN kernels are not
deterministic, so a restored run only stays close to the uninterrupted one.
"""

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from anas.errors import ConfigError, NonFiniteLossError
from anas.genotypes import Genotype, genotype_from_dict
from anas.losses import LOSSES
from anas.networks import Generator, build_discriminator, init_weights

__all__ = ["CONFIG_KEYS", "NonFiniteLossError", "Retrain", "RetrainSettings"]

# Layout version of `Retrain.state_dict()`; `load_state_dict` rejects any other version.
STATE_VERSION = 1


@dataclass(frozen=True)
class RetrainSettings:
    latent_dim: int  # length of the noise vector z, split evenly across the generator's cells
    g_channels: int  # channels of every generator cell
    d_channels: int  # channels of every discriminator cell or AutoGAN block
    img_size: int  # image width and height in pixels, a multiple of 8 from 16 up
    img_channels: int  # 1 (grey) or 3 (RGB)
    batch_size: int  # real images, and as many generated ones, per discriminator update
    gen_batch_size: int  # generated images per generator update
    n_critic: int  # discriminator updates per generator update
    loss: str  # a name in anas.losses.LOSSES
    g_lr: float  # Adam learning rate of the generator before any decay
    d_lr: float  # Adam learning rate of the discriminator before any decay
    betas: tuple[float, float]  # Adam (beta1, beta2) of both networks
    lr_decay: bool  # true: both learning rates fall linearly to 0 at `iterations`
    iterations: int  # length of the run, in generator updates
    ema_decay: float  # weight that G_ema keeps at each generator update, in [0, 1)

    def __post_init__(self):
        for name in ("latent_dim", "g_channels", "d_channels", "batch_size", "gen_batch_size"):
            _check(self, name, _is_integer(getattr(self, name), minimum=1), "a positive integer")
        _check(self, "n_critic", _is_integer(self.n_critic, minimum=1), "a positive integer")
        _check(self, "iterations", _is_integer(self.iterations, minimum=1), "a positive integer")
        for name in ("g_lr", "d_lr"):
            value = getattr(self, name)
            _check(self, name, _is_real(value) and 0.0 < value < math.inf, "a positive number")
        betas_valid = (
            isinstance(self.betas, list | tuple)
            and len(self.betas) == 2
            and all(_is_real(b) and 0.0 <= b < 1.0 for b in self.betas)
        )
        _check(self, "betas", betas_valid, "two numbers in [0, 1)")
        ema_valid = _is_real(self.ema_decay) and 0.0 <= self.ema_decay < 1.0
        _check(self, "ema_decay", ema_valid, "a number in [0, 1)")
        _check(self, "lr_decay", isinstance(self.lr_decay, bool), "true or false")
        loss_valid = isinstance(self.loss, str) and self.loss in LOSSES
        _check(self, "loss", loss_valid, f"one of {', '.join(LOSSES.names())}")
        # A YAML list arrives as a list; a tuple keeps the settings hashable.
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    @classmethod
    def from_config(cls, config: Mapping) -> "RetrainSettings":
        """Read the settings from a composed config given as a plain nested dict."""
        values = {}
        for field in fields(cls):
            section, key = CONFIG_KEYS[field.name].split(".")
            try:
                values[field.name] = config[section][key]
            except (KeyError, TypeError):
                raise ConfigError(f"{section}.{key}: missing from the config") from None
        return cls(**values)


# The config key that sets each field; errors about a field name this key.
CONFIG_KEYS = {field.name: f"retrain.{field.name}" for field in fields(RetrainSettings)} | {
    "latent_dim": "model.latent_dim",
    "img_size": "data.img_size",
    "img_channels": "data.channels",
}


def _is_integer(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(settings: RetrainSettings, name: str, valid: bool, expected: str) -> None:
    if not valid:
        value = getattr(settings, name)
        raise ConfigError(f"{CONFIG_KEYS[name]}: expected {expected}, got {value!r}")


class Retrain:
    """The discrete G and D of one retrain trial, their optimizers, G_ema and noise sources.

    `d_spec` is a discriminator Genotype or "autogan" for the fixed AutoGAN discriminator.
    The loop belongs to the caller: call `step(stream)` until `done`, and save `state_dict()`
    together with the stream's state. The stream counts epochs, because only the stream has
    the dataset size.
    """

    def __init__(
        self,
        settings: RetrainSettings,
        g_genotype: Genotype,
        d_spec: Genotype | str,
        device: torch.device | str,
        seed: int,
        fixed_noise_count: int = 64,
    ):
        self.settings = s = settings
        self.device = torch.device(device)
        self.g_genotype, self.d_spec = g_genotype, d_spec
        self.loss = LOSSES.get(s.loss, key=CONFIG_KEYS["loss"])

        # Independent seeds for initialisation, training noise, sampling noise and fixed noise.
        init_seed, noise_seed, sample_seed, fixed_seed = (
            int(x) for x in np.random.SeedSequence(seed).generate_state(4, dtype=np.uint64)
        )

        # Module constructors (default init, spectral-norm vectors) draw from the global CPU
        # generator, so the networks are built on the CPU inside fork_rng with that generator
        # reseeded. The weights are then the same on every device, and the process's random
        # state is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(init_seed)
            G = Generator(s.latent_dim, s.g_channels, s.img_size, s.img_channels, g_genotype)
            D = build_discriminator(d_spec, s.d_channels, s.img_size, s.img_channels)
            # Xavier-uniform, the published AdversarialNAS retraining choice. NOTE: that code
            # applied it to convolutions only, drew BatchNorm scales from N(1, 0.02) and kept
            # PyTorch's default for linear layers; init_weights covers convs and linears.
            init_rng = torch.Generator().manual_seed(init_seed)
            init_weights(G, init_rng)
            init_weights(D, init_rng)
        self.G = G.to(self.device).train()
        self.D = D.to(self.device).train()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)

        self.g_optimizer = torch.optim.Adam(self.G.parameters(), lr=s.g_lr, betas=s.betas)
        self.d_optimizer = torch.optim.Adam(self.D.parameters(), lr=s.d_lr, betas=s.betas)
        # Without decay the schedule is a constant factor 1, so the state layout is the same.
        end_factor = 0.0 if s.lr_decay else 1.0
        self.g_scheduler = torch.optim.lr_scheduler.LinearLR(
            self.g_optimizer, start_factor=1.0, end_factor=end_factor, total_iters=s.iterations
        )
        self.d_scheduler = torch.optim.lr_scheduler.LinearLR(
            self.d_optimizer, start_factor=1.0, end_factor=end_factor, total_iters=s.iterations
        )

        self.noise_rng = torch.Generator(device=self.device).manual_seed(noise_seed)
        self.sample_rng = torch.Generator(device=self.device).manual_seed(sample_seed)
        # Drawn on the CPU so that the sample grid shows the same latents on every device.
        fixed_rng = torch.Generator().manual_seed(fixed_seed)
        self.fixed_noise = torch.randn(fixed_noise_count, s.latent_dim, generator=fixed_rng).to(
            self.device
        )  # (fixed_noise_count, latent_dim)

        self.d_steps = 0  # discriminator updates so far
        self.g_steps = 0  # generator updates so far
        self.critic_position = 0  # discriminator updates since the last generator update

    @property
    def done(self) -> bool:
        return self.g_steps >= self.settings.iterations

    def parameter_counts(self) -> dict[str, int]:
        return {
            "generator": sum(p.numel() for p in self.G.parameters()),
            "discriminator": sum(p.numel() for p in self.D.parameters()),
        }

    # Training

    def step(self, stream) -> dict[str, float]:
        """Run one discriminator update, and the generator update that completes each cycle.

        `stream.next(n)` returns n real images in [-1, 1], shape (n, img_channels, img_size,
        img_size). Returns `d_loss` and, on steps that update the generator, `g_loss`, `g_lr`
        and `d_lr` (the learning rates for the next cycle).

        Raises NonFiniteLossError before the optimizer step of a loss or gradient that is NaN or
        infinite. Forward passes may already have changed BatchNorm running statistics and
        spectral-norm vectors, and the discriminator update of this step may have happened when
        the generator loss fails, so continue only from a saved state.
        """
        s = self.settings
        G, D = self.G, self.D

        # Discriminator update on real images and detached fakes.
        real = self._real_batch(stream)  # (batch_size, C, H, W)
        with torch.no_grad():
            fake = G(self._noise(s.batch_size))  # (batch_size, C, H, W)
        d_loss = self.loss.d_loss(D(real), D(fake))
        update = f"discriminator update {self.d_steps + 1}"
        metrics = {"d_loss": self._update(d_loss, D, self.d_optimizer, "d_loss", update)}
        self.d_steps += 1
        self.critic_position += 1
        if self.critic_position < s.n_critic:
            return metrics

        # Generator update through a discriminator whose weights collect no gradient.
        D.requires_grad_(False)
        try:
            g_loss = self.loss.g_loss(D(G(self._noise(s.gen_batch_size))))
            update = f"generator update {self.g_steps + 1}"
            metrics["g_loss"] = self._update(g_loss, G, self.g_optimizer, "g_loss", update)
        finally:
            D.requires_grad_(True)
        self.g_steps += 1
        self.critic_position = 0

        self._update_ema()
        self.g_scheduler.step()
        self.d_scheduler.step()
        metrics["g_lr"] = self.g_optimizer.param_groups[0]["lr"]
        metrics["d_lr"] = self.d_optimizer.param_groups[0]["lr"]
        return metrics

    def _real_batch(self, stream) -> torch.Tensor:
        s = self.settings
        real = stream.next(s.batch_size)
        expected = (s.batch_size, s.img_channels, s.img_size, s.img_size)
        if tuple(real.shape) != expected:
            raise ConfigError(
                f"data: the stream returned images of shape {tuple(real.shape)}, expected "
                f"{expected}; check data.img_size and data.channels against the dataset"
            )
        return real.to(self.device, torch.float32, non_blocking=True)

    def _noise(self, n: int) -> torch.Tensor:
        return torch.randn(
            n, self.settings.latent_dim, generator=self.noise_rng, device=self.device
        )  # (n, latent_dim)

    def _update(
        self,
        loss: torch.Tensor,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        name: str,
        update: str,
    ) -> float:
        """Backpropagate `loss` into `net` and take the optimizer step if it is finite."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        # One device-to-host copy for both checks.
        loss_value, norm_value = torch.stack([loss.detach(), grad_norm]).tolist()
        if not math.isfinite(loss_value) or not math.isfinite(norm_value):
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss_value):
                problem = f"gradient norm of {name} is {norm_value}"
            else:
                problem = f"{name} is {loss_value}"
            raise NonFiniteLossError(
                f"{problem} at {update}; no optimizer step was taken with it, so resume "
                "from the last checkpoint, perhaps with lower learning rates"
            )
        optimizer.step()
        return loss_value

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.settings.ema_decay
        for average, current in zip(self.G_ema.parameters(), self.G.parameters(), strict=True):
            average.lerp_(current, 1.0 - decay)
        # BatchNorm buffers are copied, not averaged. The published code kept only an average
        # of the parameters and evaluated it with G's own running statistics, and averaging
        # running statistics (already a moving average) would make them lag G further still.
        for average, current in zip(self.G_ema.buffers(), self.G.buffers(), strict=True):
            average.copy_(current)

    # Sampling

    @torch.no_grad()
    def sample(
        self, n_or_z: int | torch.Tensor, ema: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Generate images in [-1, 1], shape (n, img_channels, img_size, img_size), on `device`.

        `n_or_z` is a count or a latent batch (n, latent_dim). For a count, the latents come
        from `generator` if given, else from a sampling generator of this object that the
        training noise never touches. Uses G_ema with `ema`, else G; both run in eval mode,
        batch_size latents at a time.
        """
        s = self.settings
        if isinstance(n_or_z, torch.Tensor):
            z = n_or_z.to(self.device)
        else:
            rng = generator if generator is not None else self.sample_rng
            z = torch.randn(n_or_z, s.latent_dim, generator=rng, device=rng.device).to(self.device)
        net = self.G_ema if ema else self.G
        was_training = net.training
        net.eval()
        try:
            return torch.cat([net(chunk) for chunk in z.split(s.batch_size)])
        finally:
            net.train(was_training)

    # Checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue exactly, as tensors, numbers and strings only."""
        return {
            "version": STATE_VERSION,
            "generator_genotype": self.g_genotype.to_dict(),
            "discriminator_spec": _spec_to_state(self.d_spec),
            "settings": asdict(self.settings),
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "G_ema": self.G_ema.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "g_scheduler": self.g_scheduler.state_dict(),
            "d_scheduler": self.d_scheduler.state_dict(),
            "counters": {
                "d_steps": self.d_steps,
                "g_steps": self.g_steps,
                "critic_position": self.critic_position,
            },
            "rng": {"noise": self.noise_rng.get_state(), "sample": self.sample_rng.get_state()},
            "fixed_noise": self.fixed_noise.cpu(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a state from `state_dict()` of a Retrain built for the same architectures.

        Raises ConfigError when the state has another layout version or was written for
        another generator genotype or discriminator.
        """
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"retrain checkpoint has layout version {state.get('version')!r}, expected "
                f"{STATE_VERSION}; start this trial again without resume"
            )
        saved_g = genotype_from_dict(state["generator_genotype"], "retrain checkpoint")
        if saved_g.hash != self.g_genotype.hash:
            raise ConfigError(
                f"retrain checkpoint was written for generator genotype {saved_g.hash}, this "
                f"trial retrains {self.g_genotype.hash}; resume from that trial's own checkpoint"
            )
        saved_d = state["discriminator_spec"]
        if saved_d != _spec_to_state(self.d_spec):
            raise ConfigError(
                f"retrain checkpoint was written for discriminator {_describe_spec(saved_d)}, "
                f"this trial uses {_describe_spec(_spec_to_state(self.d_spec))}; "
                "check retrain.discriminator"
            )

        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.g_scheduler.load_state_dict(state["g_scheduler"])
        self.d_scheduler.load_state_dict(state["d_scheduler"])
        counters = state["counters"]
        self.d_steps = int(counters["d_steps"])
        self.g_steps = int(counters["g_steps"])
        self.critic_position = int(counters["critic_position"])
        self.noise_rng.set_state(state["rng"]["noise"].cpu())
        self.sample_rng.set_state(state["rng"]["sample"].cpu())
        self.fixed_noise = state["fixed_noise"].to(self.device)


def _spec_to_state(spec: Genotype | str) -> dict | str:
    return spec.to_dict() if isinstance(spec, Genotype) else spec


def _describe_spec(spec: Mapping | str) -> str:
    if isinstance(spec, str):
        return repr(spec)
    return f"genotype {genotype_from_dict(spec, 'retrain checkpoint').hash}"
