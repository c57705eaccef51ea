import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from anas.errors import ConfigError
from anas.genotypes import make_genotype
from anas.networks import (
    Discriminator,
    Generator,
    arch_parameters,
    mixing_weights,
)
from anas.ops import DOWN_OPS, NORMAL_OPS, UP_OPS, build_op
from anas.topology import EDGES, NUM_CELLS, candidates

SIZES = (16, 24, 32, 48, 64)
LATENT = 12
WIDTH = 8
BATCH = 2

NORMAL = {
    "none",
    "skip_connect",
    "conv_1x1",
    "conv_3x3",
    "conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
}
UP = {"deconv", "nearest", "bilinear"}
DOWN = {"avg_pool", "max_pool", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5"}
CHANNEL_MAPPING = {"conv_1x1", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5"}
KERNELS = {"conv_1x1": 1, "conv_3x3": 3, "conv_5x5": 5, "dil_conv_3x3": 3, "dil_conv_5x5": 5}

# Fixed genotypes that between them use every operation of every family.
G_CELL = {
    "up0": "deconv",
    "up1": "bilinear",
    "c0": "conv_3x3",
    "c1": "dil_conv_5x5",
    "c2": "none",
    "c3": "skip_connect",
    "c4": "conv_1x1",
}
G_CELL_2 = G_CELL | {"up0": "nearest", "c0": "conv_5x5", "c1": "dil_conv_3x3"}
D_STEM = {
    "c0": "conv_3x3",
    "c1": "dil_conv_3x3",
    "c2": "conv_1x1",
    "c3": "none",
    "c4": "conv_5x5",
    "down0": "avg_pool",
    "down1": "conv_3x3",
}
D_CELL = {
    "c0": "skip_connect",
    "c1": "conv_5x5",
    "c2": "none",
    "c3": "dil_conv_5x5",
    "c4": "dil_conv_3x3",
    "down0": "max_pool",
    "down1": "dil_conv_5x5",
}
D_CELL_2 = D_CELL | {"down0": "conv_5x5", "down1": "avg_pool"}


def generator_genotype(img_size):
    return make_genotype("generator", img_size, [G_CELL, G_CELL_2, G_CELL])


def discriminator_genotype(img_size):
    return make_genotype("discriminator", img_size, [D_STEM, D_CELL, D_CELL_2, D_CELL])


def convolutions(net):
    return [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


# Forward shapes


@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("derived", (False, True), ids=("supernet", "derived"))
def test_generator_shape(size, channels, derived):
    genotype = generator_genotype(size) if derived else None
    G = Generator(LATENT, WIDTH, size, channels, genotype)
    images = G(torch.randn(BATCH, LATENT))
    assert images.shape == (BATCH, channels, size, size)
    assert images.abs().max() <= 1.0


@pytest.mark.parametrize("channels", (1, 3))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("derived", (False, True), ids=("supernet", "derived"))
def test_discriminator_shape(size, channels, derived):
    genotype = discriminator_genotype(size) if derived else None
    D = Discriminator(WIDTH, size, channels, genotype)
    logits = D(torch.randn(BATCH, channels, size, size))
    assert logits.shape == (BATCH,)


@pytest.mark.parametrize("size", (8, 20, 12))
def test_bad_img_size_rejected(size):
    with pytest.raises(ConfigError, match=r"data\.img_size"):
        Generator(LATENT, WIDTH, size, 3)
    with pytest.raises(ConfigError, match=r"data\.img_size"):
        Discriminator(WIDTH, size, 3)


@pytest.mark.parametrize("channels", (2, 4))
def test_bad_channels_rejected(channels):
    with pytest.raises(ConfigError, match=r"data\.channels"):
        Generator(LATENT, WIDTH, 16, channels)
    with pytest.raises(ConfigError, match=r"data\.channels"):
        Discriminator(WIDTH, 16, channels)


def test_latent_dim_indivisible_rejected():
    with pytest.raises(ConfigError, match=r"model\.latent_dim"):
        Generator(13, WIDTH, 16, 3)


def test_genotype_of_other_network_rejected():
    with pytest.raises(ConfigError):
        Generator(LATENT, WIDTH, 16, 3, discriminator_genotype(16))
    with pytest.raises(ConfigError):
        Discriminator(WIDTH, 16, 3, generator_genotype(16))


# The candidate operations


def test_operation_sets():
    assert set(NORMAL_OPS.names()) == NORMAL
    assert set(UP_OPS.names()) == UP
    assert set(DOWN_OPS.names()) == DOWN


@pytest.mark.parametrize("name", sorted(DOWN))
def test_down_op_halves(name):
    op = build_op("down", name, 4, 4, sn=False, preact=True)
    assert op(torch.randn(2, 4, 8, 8)).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("width", (3, 5))
def test_down_ops_agree_on_odd_width(width):
    # A mixed edge sums every candidate, so they must return one shape. With img_size 24 the
    # discriminator's last cell sees width 3.
    x = torch.randn(2, 4, width, width)
    shapes = {tuple(build_op("down", n, 4, 4, False, True)(x).shape) for n in DOWN}
    assert len(shapes) == 1


@pytest.mark.parametrize("name", sorted(UP))
def test_up_op_doubles(name):
    op = build_op("up", name, 4, 6, sn=False, preact=True)
    assert op(torch.randn(2, 4, 5, 5)).shape == (2, 6, 10, 10)


@pytest.mark.parametrize("name", sorted(NORMAL))
def test_normal_op_keeps_size(name):
    op = build_op("normal", name, 4, 4, sn=False, preact=True)
    assert op(torch.randn(2, 4, 7, 7)).shape == (2, 4, 7, 7)


@pytest.mark.parametrize(
    ("family", "name"),
    [("normal", n) for n in KERNELS] + [("down", n) for n in KERNELS if n != "conv_1x1"],
)
def test_conv_kernel_and_dilation(family, name):
    (conv,) = convolutions(build_op(family, name, 4, 4, sn=False, preact=True))
    dilation = 2 if name.startswith("dil_") else 1
    assert conv.kernel_size == (KERNELS[name], KERNELS[name])
    assert conv.dilation == (dilation, dilation)


def test_discriminator_convs_spectral_norm():
    for net in (
        Discriminator(WIDTH, 16, 3),
        Discriminator(WIDTH, 16, 3, discriminator_genotype(16)),
    ):
        layers = convolutions(net) + [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert layers
        for layer in layers:
            assert parametrize.is_parametrized(layer, "weight"), layer


def test_generator_convs_plain():
    for net in (
        Generator(LATENT, WIDTH, 16, 3),
        Generator(LATENT, WIDTH, 16, 3, generator_genotype(16)),
    ):
        assert convolutions(net)
        for module in net.modules():
            assert not parametrize.is_parametrized(module), module


def test_discriminator_stem_candidates():
    for edge in EDGES["discriminator"]:
        offered = set(candidates("discriminator", 0, edge))
        if edge.source == "x":
            assert offered == CHANNEL_MAPPING, edge.name
        else:
            assert offered == (NORMAL if edge.family == "normal" else DOWN), edge.name


def test_later_cells_offer_everything():
    families = {"normal": NORMAL, "up": UP, "down": DOWN}
    for network in ("generator", "discriminator"):
        first = 1 if network == "discriminator" else 0
        for cell in range(first, NUM_CELLS[network]):
            for edge in EDGES[network]:
                offered = set(candidates(network, cell, edge))
                assert offered == families[edge.family], (network, cell, edge.name)


# Architecture weights


def test_alpha_gradient_everywhere():
    torch.manual_seed(0)
    G = Generator(LATENT, WIDTH, 16, 3)
    images = G(torch.randn(BATCH, LATENT))
    (images * torch.randn_like(images)).sum().backward()
    params = arch_parameters(G)
    assert params
    for p in params:
        assert p.grad is not None
        assert bool((p.grad != 0).all()), p.grad


def test_beta_gradient_everywhere():
    torch.manual_seed(0)
    D = Discriminator(WIDTH, 16, 3)
    logits = D(torch.randn(4, 3, 16, 16))
    (logits * torch.randn_like(logits)).sum().backward()
    params = arch_parameters(D)
    assert params
    for p in params:
        assert p.grad is not None
        assert bool((p.grad != 0).all()), p.grad


def test_derived_nets_have_no_arch_weights():
    assert arch_parameters(Generator(LATENT, WIDTH, 16, 3, generator_genotype(16))) == []
    assert arch_parameters(Discriminator(WIDTH, 16, 3, discriminator_genotype(16))) == []


def flatten(weights):
    """All mixing weights of every cell and edge group as one vector."""
    if isinstance(weights, torch.Tensor):
        return weights.flatten()
    if isinstance(weights, dict):
        weights = [weights[k] for k in sorted(weights)]
    return torch.cat([flatten(w) for w in weights])


def test_gumbel_mixing_varies_per_pass():
    G = Generator(LATENT, WIDTH, 16, 3)
    rng = torch.Generator().manual_seed(0)
    first = flatten(mixing_weights(G.alpha, "generator", tau=1.0, rng=rng))
    second = flatten(mixing_weights(G.alpha, "generator", tau=1.0, rng=rng))
    assert not torch.equal(first, second)


def test_softmax_mixing_is_fixed():
    G = Generator(LATENT, WIDTH, 16, 3)
    first = flatten(mixing_weights(G.alpha, "generator"))
    second = flatten(mixing_weights(G.alpha, "generator"))
    assert torch.equal(first, second)
