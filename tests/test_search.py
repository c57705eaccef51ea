import io
import math
from dataclasses import fields, replace

import pytest
import torch

from anas.errors import ConfigError, NonFiniteLossError
from anas.genotypes import load_shipped
from anas.losses import LOSSES
from anas.networks import (
    AutoGANDiscriminator,
    Discriminator,
    Generator,
    arch_parameters,
    weight_parameters,
)
from anas.search import Search, SearchSettings
from runner.config import compose

ITERATIONS = 3
# The default config (exp=digits) with the sizes shrunk to a few milliseconds per forward pass.
TINY = [
    "model.latent_dim=12",
    "model.g_channels=8",
    "model.d_channels=8",
    "search.batch_size=2",
    "search.n_critic=1",
    f"search.iterations={ITERATIONS}",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return compose(TINY, base_dir=tmp_path_factory.mktemp("launch"))


@pytest.fixture(scope="module")
def settings(config):
    values = {
        **config["model"],
        **config["search"],
        "img_size": config["data"]["img_size"],
        "img_channels": config["data"]["channels"],
    }
    values["arch_betas"] = tuple(values["arch_betas"])
    values["betas"] = tuple(values["betas"])
    return SearchSettings(**{f.name: values[f.name] for f in fields(SearchSettings)})


class CountingStream:
    """Real images from a seeded generator; `requests` records every requested batch size."""

    def __init__(self, settings, seed=0, fill=None):
        self.shape = (settings.img_channels, settings.img_size, settings.img_size)
        self.rng = torch.Generator().manual_seed(seed)
        self.fill = fill
        self.requests = []

    def next(self, n):
        self.requests.append(n)
        if self.fill is not None:
            return torch.full((n, *self.shape), self.fill)
        return torch.rand((n, *self.shape), generator=self.rng) * 2 - 1


def parameter_groups(search):
    return {
        "alpha": arch_parameters(search.G),
        "beta": arch_parameters(search.D),
        "G": weight_parameters(search.G),
        "D": weight_parameters(search.D),
    }


def snapshot(search):
    """Copies of every parameter, per group (alpha, beta, G, D)."""
    return {k: [p.detach().clone() for p in ps] for k, ps in parameter_groups(search).items()}


def identical(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def all_changed(a, b):
    return len(a) == len(b) and all(not torch.equal(x, y) for x, y in zip(a, b, strict=True))


def kernels_changed(a, b):
    """Whether every weight matrix and kernel changed. Biases are left out: with the hinge loss
    and every logit inside the margin, the gradient of D's output bias is exactly zero."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x.dim() > 1]
    return len(pairs) > 0 and all(not torch.equal(x, y) for x, y in pairs)


def state(search):
    """The search's state that its results depend on, as tensors."""
    tensors = {f"G.{k}": v for k, v in search.G.state_dict().items()}
    tensors |= {f"D.{k}": v for k, v in search.D.state_dict().items()}
    tensors["noise"] = search.noise.get_state()
    return tensors


def run(search, stream, steps):
    return [search.step(stream) for _ in range(steps)]


# Optimizers


def test_arch_optimizer_settings(settings):
    search = Search(settings, "cpu", seed=0)
    for optimizer in (search.opt_alpha, search.opt_beta):
        (group,) = optimizer.param_groups
        assert isinstance(optimizer, torch.optim.Adam)
        assert group["lr"] == 3e-4
        assert group["betas"] == (0.5, 0.999)
        assert group["weight_decay"] == 1e-4


def test_optimizers_partition_parameters(settings):
    search = Search(settings, "cpu", seed=0)
    owned = {}
    for name in ("opt_alpha", "opt_beta", "opt_G", "opt_D"):
        optimizer = getattr(search, name)
        owned[name] = {id(p) for group in optimizer.param_groups for p in group["params"]}
    everything = {id(p) for net in (search.G, search.D) for p in net.parameters()}
    assert sum(len(ids) for ids in owned.values()) == len(set().union(*owned.values()))
    assert set().union(*owned.values()) == everything
    assert owned["opt_alpha"] == {id(p) for p in arch_parameters(search.G)}
    assert owned["opt_beta"] == {id(p) for p in arch_parameters(search.D)}


MOVES = {"opt_alpha": "alpha", "opt_beta": "beta", "opt_G": "G", "opt_D": "D"}


@pytest.mark.parametrize("optimizer", sorted(MOVES))
def test_optimizer_moves_own_group(settings, optimizer):
    # Every parameter gets a gradient first, so a step that reaches outside its group shows.
    search = Search(settings, "cpu", seed=0)
    z = torch.randn(4, settings.latent_dim, generator=torch.Generator().manual_seed(0))
    search.D(search.G(z)).sum().backward()
    before = snapshot(search)
    getattr(search, optimizer).step()
    after = snapshot(search)
    for group in before:
        if group == MOVES[optimizer]:
            assert all_changed(before[group], after[group]), group
        else:
            assert identical(before[group], after[group]), group


# One iteration


def test_step_moves_everything(settings):
    search = Search(replace(settings, n_critic=2), "cpu", seed=0)
    before = snapshot(search)
    search.step(CountingStream(settings))
    after = snapshot(search)
    assert all_changed(before["alpha"], after["alpha"])
    assert all_changed(before["beta"], after["beta"])
    assert kernels_changed(before["G"], after["G"])
    assert kernels_changed(before["D"], after["D"])


def test_step_draws_2m_per_critic(settings):
    search = Search(replace(settings, n_critic=2), "cpu", seed=0)
    stream = CountingStream(settings)
    search.step(stream)
    m = settings.batch_size
    assert stream.requests == [2 * m, 2 * m]


def test_step_metrics_finite(settings):
    metrics = Search(settings, "cpu", seed=0).step(CountingStream(settings))
    for name in ("d_arch_loss", "d_loss", "g_arch_loss", "g_loss"):
        assert math.isfinite(metrics[name]), name


def test_nan_images_raise(settings):
    search = Search(settings, "cpu", seed=0)
    with pytest.raises(NonFiniteLossError):
        search.step(CountingStream(settings, fill=float("nan")))


def test_unknown_loss_rejected(settings):
    with pytest.raises(ConfigError, match=r"search\.loss"):
        Search(replace(settings, loss="wasserstein"), "cpu", seed=0)


def test_sample_shape_and_repeatable(settings):
    search = Search(settings, "cpu", seed=0)
    first = search.sample(3, seed=7)
    size = settings.img_size
    assert first.shape == (3, settings.img_channels, size, size)
    assert torch.equal(first, search.sample(3, seed=7))
    assert search.G.training


# Losses

REAL = [2.0, 0.5, -1.0, 0.0]
FAKE = [-2.0, 0.3, 1.5, -0.7]


def mean(values):
    return sum(values) / len(values)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def losses_of(name):
    loss = LOSSES.get(name)
    real, fake = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    return loss.d_loss(real, fake).item(), loss.g_loss(fake).item()


def test_loss_names():
    assert set(LOSSES.names()) == {"hinge", "minimax"}


def test_hinge_values():
    d, g = losses_of("hinge")
    expected_d = mean([max(0.0, 1 - r) for r in REAL]) + mean([max(0.0, 1 + f) for f in FAKE])
    assert d == pytest.approx(expected_d, rel=1e-12)
    assert g == pytest.approx(-mean(FAKE), rel=1e-12)


def test_minimax_values():
    d, g = losses_of("minimax")
    expected_d = -mean([math.log(sigmoid(r)) for r in REAL]) - mean(
        [math.log(1 - sigmoid(f)) for f in FAKE]
    )
    assert d == pytest.approx(expected_d, rel=1e-12)
    assert g == pytest.approx(-mean([math.log(sigmoid(f)) for f in FAKE]), rel=1e-12)


# Gumbel temperature and determinism


@pytest.fixture(scope="module")
def gumbel_settings(settings):
    return replace(settings, gumbel=True)


@pytest.fixture(scope="module")
def reference(gumbel_settings):
    """A search of ITERATIONS steps with Gumbel-softmax on: its metrics, state and genotypes,
    and its parameters after the first step."""
    search = Search(gumbel_settings, "cpu", seed=0)
    stream = CountingStream(gumbel_settings)
    metrics = run(search, stream, 1)
    first = snapshot(search)
    metrics += run(search, stream, ITERATIONS - 1)
    return {
        "metrics": metrics,
        "first": first,
        "state": state(search),
        "genotypes": search.genotypes(),
    }


def test_tau_starts_at_max(gumbel_settings):
    assert Search(gumbel_settings, "cpu", seed=0).tau() == gumbel_settings.tau_max


def test_tau_anneals_linearly(gumbel_settings, reference):
    last = ITERATIONS - 1
    expected = [
        gumbel_settings.tau_max + (gumbel_settings.tau_min - gumbel_settings.tau_max) * k / last
        for k in range(ITERATIONS)
    ]
    assert [m["tau"] for m in reference["metrics"]] == pytest.approx(expected, rel=1e-12)


def test_tau_none_without_gumbel(settings):
    search = Search(replace(settings, gumbel=False), "cpu", seed=0)
    assert search.tau() is None
    assert "tau" not in search.step(CountingStream(settings))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_bitwise(gumbel_settings, reference):
    search = Search(gumbel_settings, "cpu", seed=0)
    metrics = run(search, CountingStream(gumbel_settings), ITERATIONS)
    assert metrics == reference["metrics"]
    assert_same_state(state(search), reference["state"])
    assert search.genotypes() == reference["genotypes"]


def test_other_seed_differs(settings):
    alpha = [arch_parameters(Search(settings, "cpu", seed=s).G) for s in (0, 1)]
    assert not identical(*alpha)


def test_gumbel_changes_search(settings, reference):
    # Same seed and data with a plain softmax: a different first step shows that the Gumbel
    # samples reach the updates.
    search = Search(replace(settings, gumbel=False), "cpu", seed=0)
    search.step(CountingStream(settings))
    assert not identical(snapshot(search)["alpha"], reference["first"]["alpha"])


def test_resume_bitwise(gumbel_settings, reference):
    stream = CountingStream(gumbel_settings)
    interrupted = Search(gumbel_settings, "cpu", seed=0)
    run(interrupted, stream, 1)
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensors, numbers and strings only

    # A different seed, so anything the checkpoint misses shows up as a difference.
    resumed = Search(gumbel_settings, "cpu", seed=5)
    resumed.load_state_dict(saved)
    metrics = run(resumed, stream, ITERATIONS - 1)
    assert metrics == reference["metrics"][1:]
    assert_same_state(state(resumed), reference["state"])
    assert resumed.genotypes() == reference["genotypes"]


# Derived networks train


def train_steps(G, D, latent_dim, steps=3):
    """Hinge-loss GAN updates on random images; returns the losses and whether every weight
    matrix and kernel of G and of D changed."""
    loss = LOSSES.get("hinge")
    rng = torch.Generator().manual_seed(0)
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.0, 0.9))
    before = [[p.detach().clone() for p in net.parameters()] for net in (G, D)]
    shape = (4, G.img_channels, G.img_size, G.img_size)
    values = []
    for _ in range(steps):
        real = torch.rand(shape, generator=rng) * 2 - 1
        fake = G(torch.randn(4, latent_dim, generator=rng)).detach()
        d_loss = loss.d_loss(D(real), D(fake))
        opt_D.zero_grad()
        d_loss.backward()
        opt_D.step()

        g_loss = loss.g_loss(D(G(torch.randn(4, latent_dim, generator=rng))))
        opt_G.zero_grad()
        g_loss.backward()
        opt_G.step()
        values += [d_loss.item(), g_loss.item()]
    after = [list(net.parameters()) for net in (G, D)]
    return values, [kernels_changed(b, a) for b, a in zip(before, after, strict=True)]


def test_searched_genotypes_train(settings):
    search = Search(settings, "cpu", seed=0)
    search.step(CountingStream(settings))
    genotype_G, genotype_D = search.genotypes()
    s = settings
    G = Generator(s.latent_dim, s.g_channels, s.img_size, s.img_channels, genotype_G)
    D = Discriminator(s.d_channels, s.img_size, s.img_channels, genotype_D)
    losses, changed = train_steps(G, D, s.latent_dim)
    assert all(math.isfinite(v) for v in losses), losses
    assert changed[0]
    assert changed[1]


def test_shipped_with_autogan_trains():
    G = Generator(12, 8, 32, 3, load_shipped("adversarialnas-cifar10"))
    D = AutoGANDiscriminator(8, 32, 3)
    losses, changed = train_steps(G, D, 12)
    assert all(math.isfinite(v) for v in losses), losses
    assert changed[0]
    assert changed[1]
