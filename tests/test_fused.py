"""The merged supernet (anas.fused) against the straightforward formulation (MixedEdge): same
outputs and gradients for network weights, alpha and beta, within 1e-5 relative.

Gradients are compared in float64: several true gradients are exactly zero (a bias followed by
BatchNorm), and in float32 both formulations compute them as rounding noise of different sizes.
"""

import copy

import pytest
import torch

from anas.fused import _conv_by_parity
from anas.networks import Discriminator, Generator, mixing_weights
from anas.search import weights_once

TOLERANCE = 1e-5


def set_fused(net: torch.nn.Module, fused: bool) -> None:
    net.fused = fused


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """|a - b| over |b|, with a floor of `scale` for tensors whose true gradient is about zero
    (a bias followed by BatchNorm)."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), scale))


def forward_backward(G, D, z, fused, tau=None, seed=0, channels_last=False):
    G, D = copy.deepcopy(G).to(z.dtype), copy.deepcopy(D).to(z.dtype)
    set_fused(G, fused)
    set_fused(D, fused)
    if channels_last:
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    rng = torch.Generator().manual_seed(seed)
    g_weights = mixing_weights(G.alpha, "generator", tau, rng)
    d_weights = mixing_weights(D.beta, "discriminator", tau, rng)
    images = G(z, g_weights)
    logits = D(images, d_weights)
    (logits.square().mean() + images.mean()).backward()
    grads = {f"G.{n}": p.grad for n, p in G.named_parameters()}
    grads |= {f"D.{n}": p.grad for n, p in D.named_parameters()}
    return images.detach(), logits.detach(), grads


SHAPES = [(16, 1), (24, 3), (32, 3)]


def test_fused_float32_outputs_match():
    torch.manual_seed(0)
    G, D = Generator(12, 8, 32, 3), Discriminator(8, 32, 3)
    z = torch.randn(4, 12)
    ref_images, ref_logits, _ = forward_backward(G, D, z, fused=False)
    images, logits, _ = forward_backward(G, D, z, fused=True, channels_last=True)
    assert relative_error(images, ref_images, 1e-12) < TOLERANCE
    assert relative_error(logits, ref_logits, 1e-12) < TOLERANCE


@pytest.mark.parametrize("img_size,channels", SHAPES)
@pytest.mark.parametrize("tau", [None, 1.0])
def test_fused_matches_reference(img_size, channels, tau):
    torch.manual_seed(0)
    G = Generator(12, 8, img_size, channels)
    D = Discriminator(8, img_size, channels)
    z = torch.randn(4, 12, dtype=torch.float64)
    ref_images, ref_logits, ref_grads = forward_backward(G, D, z, fused=False, tau=tau)
    images, logits, grads = forward_backward(G, D, z, fused=True, tau=tau)

    assert relative_error(images, ref_images, 1e-12) < TOLERANCE
    assert relative_error(logits, ref_logits, 1e-12) < TOLERANCE
    scale = 1e-6 * max(float(g.norm()) for g in ref_grads.values())
    errors = {n: relative_error(grads[n], ref_grads[n], scale) for n in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"


def test_fused_grads_reach_alpha_and_beta():
    torch.manual_seed(0)
    G, D = Generator(12, 8, 16, 1), Discriminator(8, 16, 1)
    _, _, grads = forward_backward(G, D, torch.randn(4, 12), fused=True)
    arch = {n: g for n, g in grads.items() if ".alpha." in n or ".beta." in n}
    assert len(arch) == len(G.alpha) + len(D.beta)
    assert all(bool((g != 0).all()) for g in arch.values())


def test_channels_last_matches_reference():
    torch.manual_seed(0)
    G, D = Generator(12, 8, 32, 3), Discriminator(8, 32, 3)
    z = torch.randn(4, 12, dtype=torch.float64)
    _, ref_logits, ref_grads = forward_backward(G, D, z, fused=False)
    _, logits, grads = forward_backward(G, D, z, fused=True, channels_last=True)
    assert relative_error(logits, ref_logits, 1e-12) < TOLERANCE
    scale = 1e-6 * max(float(g.norm()) for g in ref_grads.values())
    errors = {n: relative_error(grads[n], ref_grads[n], scale) for n in ref_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: {errors[worst]:.2e}"


def test_derived_cells_are_not_fused():
    from anas.genotypes import load_shipped

    G = Generator(12, 8, 32, 3, load_shipped("adversarialnas-cifar10"))
    assert not G.fused


def test_weights_once_matches_per_forward():
    """With the weights frozen for a block, D gives the outputs of its first forward pass."""
    torch.manual_seed(0)
    D = Discriminator(8, 16, 1)
    x = torch.randn(4, 1, 16, 16)
    first = copy.deepcopy(D)(x)
    with weights_once(D, grad=False):
        once = [D(x), D(x)]
    assert torch.equal(once[0], once[1])
    assert torch.allclose(once[0], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side,kernel", [(2, 3), (4, 3), (8, 5)])
def test_parity_conv_matches_dilated(side, kernel):
    torch.manual_seed(0)
    x = torch.randn(3, 4, side, side, dtype=torch.float64)
    weight = torch.randn(5, 4, kernel, kernel, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, weight, bias, 1, kernel - 1, 2)
    out = _conv_by_parity(x, weight, bias, kernel)
    assert out.shape == expected.shape
    assert relative_error(out, expected, 1e-12) < TOLERANCE


@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_spectral_norm_state_matches(channels_last):
    """Two forward passes: the second one reads the power iteration state the first wrote."""
    torch.manual_seed(0)
    D = Discriminator(8, 16, 3).double()
    weights = mixing_weights(D.beta, "discriminator")
    logits = {}
    for fused in (False, True):
        net = copy.deepcopy(D)
        set_fused(net, fused)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        x = torch.randn(
            4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        net(x, weights)
        logits[fused] = (net(x, weights), net.state_dict())
    assert relative_error(logits[True][0], logits[False][0], 1e-12) < TOLERANCE
    for name, buffer in logits[False][1].items():
        assert relative_error(logits[True][1][name], buffer, 1e-12) < TOLERANCE, name
