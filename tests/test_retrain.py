import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from anas.checkpoint import load_checkpoint, save_checkpoint
from anas.data import BatchStream, load_images
from anas.errors import ConfigError, NonFiniteLossError
from anas.genotypes import genotype_from_dict, load_shipped
from anas.losses import LOSSES, GANLoss
from anas.networks import AutoGANDiscriminator, Discriminator, Generator
from anas.retrain import Retrain, RetrainSettings

# A loss whose generator term is NaN, to fail exactly the generator update.
# Hinge for D and NaN for G, set on a Retrain object directly so the loss registry that other
# tests enumerate stays as shipped.
NAN_GENERATOR_LOSS = GANLoss(
    d_loss=LOSSES.get("hinge").d_loss,
    g_loss=lambda fake: fake.mean() * float("nan"),
)

DIGITS = RetrainSettings(
    latent_dim=12,
    g_channels=8,
    d_channels=8,
    img_size=16,
    img_channels=1,
    batch_size=4,
    gen_batch_size=6,
    n_critic=2,
    loss="hinge",
    g_lr=2e-4,
    d_lr=2e-4,
    betas=(0.0, 0.9),
    lr_decay=True,
    iterations=5,
    ema_decay=0.9,
)

D_CELL = {
    "c0": "conv_3x3",
    "c1": "conv_3x3",
    "c2": "conv_1x1",
    "c3": "skip_connect",
    "c4": "dil_conv_3x3",
    "down0": "avg_pool",
    "down1": "conv_3x3",
}


class SeededStream:
    """Uniform images in [-1, 1] from a torch generator whose state can be saved."""

    def __init__(self, settings, seed=0, fill=None):
        s = settings
        self.shape = (s.img_channels, s.img_size, s.img_size)
        self.rng = torch.Generator().manual_seed(seed)
        self.fill = fill

    def next(self, n):
        images = torch.rand((n, *self.shape), generator=self.rng) * 2 - 1
        if self.fill is not None:
            images.fill_(self.fill)
        return images

    def state_dict(self):
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state):
        self.rng.set_state(state["rng"])


def g_genotype():
    return load_shipped("adversarialnas-cifar10")


def d_genotype():
    data = {
        "schema_version": 1,
        "network": "discriminator",
        "img_size": 16,
        "cells": [dict(D_CELL) for _ in range(4)],
    }
    return genotype_from_dict(data, "test discriminator")


def make(settings=DIGITS, d_spec=None, seed=0):
    return Retrain(settings, g_genotype(), d_spec or d_genotype(), "cpu", seed)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def parameters_of(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_same_state(left, right):
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_steps_give_finite_losses():
    retrain = make()
    stream = SeededStream(DIGITS)
    history = [retrain.step(stream) for _ in range(4)]
    assert all(math.isfinite(v) for metrics in history for v in metrics.values())
    assert [("g_loss" in metrics) for metrics in history] == [False, True, False, True]
    assert retrain.d_steps == 4
    assert retrain.g_steps == 2
    assert retrain.critic_position == 0


def test_step_changes_weights():
    retrain = make()
    g_before, d_before = parameters_of(retrain.G), parameters_of(retrain.D)
    retrain.step(SeededStream(DIGITS))
    retrain.step(SeededStream(DIGITS))
    g_after, d_after = parameters_of(retrain.G), parameters_of(retrain.D)
    assert any(not torch.equal(a, b) for a, b in zip(g_before, g_after, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, d_after, strict=True))


def run_and_resume(tmp_path, settings, make_stream, total, split):
    """Return the uninterrupted run, the run saved after `split` steps and its resumed copy.

    The resumed copy is rebuilt from another seed, loaded and stepped to `total` steps.
    """
    uninterrupted = make(settings)
    stream = make_stream()
    for _ in range(total):
        uninterrupted.step(stream)

    first = make(settings)
    stream = make_stream()
    for _ in range(split):
        first.step(stream)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"retrain": first.state_dict(), "stream": stream.state_dict()})

    # A different seed and a disturbed process RNG: everything must come from the checkpoint.
    torch.manual_seed(1234)
    resumed = make(settings, seed=99)
    stream = make_stream()
    stream.next(settings.batch_size)
    state = load_checkpoint(path)
    resumed.load_state_dict(state["retrain"])
    stream.load_state_dict(state["stream"])
    for _ in range(total - split):
        resumed.step(stream)
    return uninterrupted, first, resumed


def assert_same_run(resumed, uninterrupted):
    assert_same_state(snapshot(resumed.G), snapshot(uninterrupted.G))
    assert_same_state(snapshot(resumed.D), snapshot(uninterrupted.D))
    assert_same_state(snapshot(resumed.G_ema), snapshot(uninterrupted.G_ema))
    assert resumed.d_steps == uninterrupted.d_steps
    assert resumed.g_steps == uninterrupted.g_steps
    assert resumed.critic_position == uninterrupted.critic_position
    resumed_lr = resumed.g_optimizer.param_groups[0]["lr"]
    assert resumed_lr == uninterrupted.g_optimizer.param_groups[0]["lr"]
    assert torch.equal(resumed.fixed_noise, uninterrupted.fixed_noise)


def test_resume_mid_cycle_bit_identical(tmp_path):
    settings = replace(DIGITS, n_critic=3)
    # Step 4 is the first discriminator update of the second cycle.
    uninterrupted, first, resumed = run_and_resume(
        tmp_path, settings, lambda: SeededStream(settings, seed=7), total=8, split=4
    )
    assert first.critic_position == 1
    assert_same_run(resumed, uninterrupted)


def test_resume_with_digits_stream(tmp_path):
    data = {"name": "digits", "root": None, "img_size": 16, "channels": 1}
    images = load_images(data, "train", tmp_path / "cache")
    uninterrupted, _, resumed = run_and_resume(
        tmp_path, DIGITS, lambda: BatchStream(images, seed=5, device="cpu"), total=5, split=3
    )
    assert_same_run(resumed, uninterrupted)


def test_nan_stream_raises_before_update():
    retrain = make()
    g_before, d_before = parameters_of(retrain.G), parameters_of(retrain.D)
    optimizer_before = retrain.d_optimizer.state_dict()["state"]
    with pytest.raises(NonFiniteLossError, match="d_loss is nan at discriminator update 1"):
        retrain.step(SeededStream(DIGITS, fill=float("nan")))
    for before, after in zip(d_before, retrain.D.parameters(), strict=True):
        assert torch.equal(before, after)
    for before, after in zip(g_before, retrain.G.parameters(), strict=True):
        assert torch.equal(before, after)
    assert retrain.d_optimizer.state_dict()["state"] == optimizer_before == {}
    assert retrain.d_steps == 0


def test_nan_stream_after_healthy_steps():
    retrain = make()
    retrain.step(SeededStream(DIGITS))
    d_before = parameters_of(retrain.D)
    with pytest.raises(NonFiniteLossError, match="discriminator update 2"):
        retrain.step(SeededStream(DIGITS, fill=float("inf")))
    for before, after in zip(d_before, retrain.D.parameters(), strict=True):
        assert torch.equal(before, after)
    assert retrain.d_steps == 1


def test_nan_generator_loss_raises():
    retrain = make(replace(DIGITS, n_critic=1))
    retrain.loss = NAN_GENERATOR_LOSS
    g_before, ema_before = parameters_of(retrain.G), snapshot(retrain.G_ema)
    with pytest.raises(NonFiniteLossError, match="g_loss is nan at generator update 1"):
        retrain.step(SeededStream(DIGITS))
    for before, after in zip(g_before, retrain.G.parameters(), strict=True):
        assert torch.equal(before, after)
    assert_same_state(snapshot(retrain.G_ema), ema_before)
    assert retrain.g_steps == 0
    assert retrain.g_optimizer.param_groups[0]["lr"] == DIGITS.g_lr


def test_nan_generator_loss_leaves_discriminator_trainable():
    retrain = make(replace(DIGITS, n_critic=1))
    retrain.loss = NAN_GENERATOR_LOSS
    with pytest.raises(NonFiniteLossError):
        retrain.step(SeededStream(DIGITS))
    assert all(p.requires_grad for p in retrain.D.parameters())


def test_ema_buffers_equal_generator():
    retrain = make(replace(DIGITS, n_critic=1))
    stream = SeededStream(DIGITS)
    retrain.step(stream)
    buffers = dict(retrain.G.named_buffers())
    assert buffers, "the generator has BatchNorm buffers to copy"
    for name, average in retrain.G_ema.named_buffers():
        assert torch.equal(average, buffers[name]), name


def test_ema_parameters_follow_formula():
    settings = replace(DIGITS, n_critic=1)
    retrain = make(settings)
    stream = SeededStream(settings)
    retrain.step(stream)
    ema_before = parameters_of(retrain.G_ema)
    retrain.step(stream)
    decay = settings.ema_decay
    for old, current, average in zip(
        ema_before, retrain.G.parameters(), retrain.G_ema.parameters(), strict=True
    ):
        assert torch.allclose(average, decay * old + (1 - decay) * current, atol=1e-7)


def test_autogan_discriminator_trains():
    retrain = make(d_spec="autogan")
    assert isinstance(retrain.D, AutoGANDiscriminator)
    stream = SeededStream(DIGITS)
    history = [retrain.step(stream) for _ in range(4)]
    assert all(math.isfinite(v) for metrics in history for v in metrics.values())
    assert retrain.g_steps == 2


def test_searched_discriminator_built():
    assert isinstance(make().D, Discriminator)


def test_done_after_iterations():
    settings = replace(DIGITS, n_critic=1, iterations=3)
    retrain = make(settings)
    stream = SeededStream(settings)
    states = []
    for _ in range(3):
        states.append(retrain.done)
        retrain.step(stream)
    assert states == [False, False, False]
    assert retrain.done


def test_lr_decays_linearly_to_zero():
    settings = replace(DIGITS, n_critic=1, iterations=4)
    retrain = make(settings)
    stream = SeededStream(settings)
    rates = [retrain.step(stream)["g_lr"] for _ in range(4)]
    expected = [settings.g_lr * (1 - k / 4) for k in range(1, 5)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert retrain.d_optimizer.param_groups[0]["lr"] == 0.0


def test_lr_constant_without_decay():
    settings = replace(DIGITS, n_critic=1, iterations=3, lr_decay=False)
    retrain = make(settings)
    stream = SeededStream(settings)
    rates = [retrain.step(stream)["d_lr"] for _ in range(3)]
    assert rates == [settings.d_lr] * 3


def test_sample_shape_and_range():
    retrain = make()
    images = retrain.sample(5)
    assert images.shape == (5, 1, 16, 16)
    assert images.min() >= -1.0
    assert images.max() <= 1.0


def test_sample_fixed_noise_repeats():
    retrain = make()
    first = retrain.sample(retrain.fixed_noise)
    second = retrain.sample(retrain.fixed_noise)
    assert torch.equal(first, second)
    assert first.shape[0] == retrain.fixed_noise.shape[0]


def test_sample_keeps_generator_mode():
    retrain = make()
    retrain.sample(3, ema=False)
    assert retrain.G.training
    assert not retrain.G_ema.training


def test_sampling_leaves_training_unchanged():
    plain, sampled = make(), make()
    plain_stream, sampled_stream = SeededStream(DIGITS), SeededStream(DIGITS)
    for _ in range(4):
        plain.step(plain_stream)
        sampled.step(sampled_stream)
        sampled.sample(3)
        sampled.sample(2, ema=False)
    assert_same_state(snapshot(sampled.G), snapshot(plain.G))
    assert_same_state(snapshot(sampled.D), snapshot(plain.D))


def test_same_seed_same_weights():
    assert_same_state(snapshot(make(seed=3).G), snapshot(make(seed=3).G))


def test_different_seed_different_weights():
    first, second = snapshot(make(seed=3).G), snapshot(make(seed=4).G)
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_construction_leaves_global_rng():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    make()
    assert torch.equal(torch.rand(3), expected)


def test_parameter_counts():
    counts = make(d_spec="autogan").parameter_counts()
    s = DIGITS
    reference_g = Generator(s.latent_dim, s.g_channels, s.img_size, s.img_channels, g_genotype())
    reference_d = AutoGANDiscriminator(s.d_channels, s.img_size, s.img_channels)
    assert counts["generator"] == sum(p.numel() for p in reference_g.parameters())
    assert counts["discriminator"] == sum(p.numel() for p in reference_d.parameters())


def test_load_rejects_other_discriminator():
    state = make(d_spec="autogan").state_dict()
    with pytest.raises(ConfigError, match="discriminator 'autogan'"):
        make().load_state_dict(state)


def test_load_rejects_other_version():
    retrain = make()
    state = retrain.state_dict() | {"version": 0}
    with pytest.raises(ConfigError, match="layout version 0"):
        retrain.load_state_dict(state)


def test_stream_shape_checked():
    retrain = make()
    wrong = SeededStream(replace(DIGITS, img_size=24))
    with pytest.raises(ConfigError, match="data.img_size"):
        retrain.step(wrong)


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("n_critic", 0, "retrain.n_critic"),
        ("iterations", 2.5, "retrain.iterations"),
        ("g_lr", float("inf"), "retrain.g_lr"),
        ("d_lr", -1.0, "retrain.d_lr"),
        ("betas", (0.0,), "retrain.betas"),
        ("ema_decay", 1.0, "retrain.ema_decay"),
        ("lr_decay", "yes", "retrain.lr_decay"),
        ("loss", "wasserstein", "retrain.loss"),
        ("latent_dim", 0, "model.latent_dim"),
    ],
)
def test_settings_reject_invalid(field, value, key):
    with pytest.raises(ConfigError, match=key):
        replace(DIGITS, **{field: value})


def digits_config():
    return {
        "model": {"latent_dim": 12},
        "data": {"img_size": 16, "channels": 1},
        "retrain": {
            "g_channels": 8,
            "d_channels": 8,
            "batch_size": 4,
            "gen_batch_size": 6,
            "n_critic": 2,
            "loss": "hinge",
            "g_lr": 2e-4,
            "d_lr": 2e-4,
            "betas": [0.0, 0.9],
            "lr_decay": True,
            "iterations": 5,
            "ema_decay": 0.9,
        },
    }


def test_settings_from_config():
    assert RetrainSettings.from_config(digits_config()) == DIGITS


def test_settings_from_config_missing_key():
    config = digits_config()
    del config["retrain"]["ema_decay"]
    with pytest.raises(ConfigError, match="retrain.ema_decay: missing"):
        RetrainSettings.from_config(config)


def test_benchmark_reports_throughput(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "retrain_step.py"
    spec = importlib.util.spec_from_file_location("retrain_step_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    arguments = ["--cycles", "1", "--warmup-cycles", "0", "--shape", "digits", "--device", "cpu"]
    assert benchmark.main(arguments) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shape"] == "digits"
    assert result["img_size"] == 16
    assert result["images_per_second"] > 0
