"""Candidate operations of the search space, one registry per family.

Every operation maps a tensor of shape (batch, c_in, height, width) to (batch, c_out, height',
width'), where height' is height for normal operations, twice it for up operations and half of it
for down operations. Convolutions are pre-activated (ReLU, then conv) as in the published
AdversarialNAS search space; the discriminator builds them with spectral normalisation. Adding an
operation is one `register` entry: genotypes store these names, never positions in a list.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from anas.registry import Registry


@dataclass(frozen=True)
class OpSpec:
    """How to build one candidate operation.

    build(c_in, c_out, sn, preact) returns the module; `sn` asks for spectral normalisation and
    `preact` for the ReLU before a convolution (off where the input is the image itself).
    maps_channels says whether it can change the channel count (c_in != c_out).
    conv gives (kernel, dilation) for plain convolutions, so a supernet can merge them.
    """

    build: Callable[[int, int, bool, bool], nn.Module]
    maps_channels: bool
    conv: tuple[int, int] | None = None


NORMAL_OPS: Registry[OpSpec] = Registry("normal operation")
UP_OPS: Registry[OpSpec] = Registry("up-sampling operation")
DOWN_OPS: Registry[OpSpec] = Registry("down-sampling operation")

FAMILIES: dict[str, Registry[OpSpec]] = {"normal": NORMAL_OPS, "up": UP_OPS, "down": DOWN_OPS}


def conv2d(c_in, c_out, kernel, stride=1, dilation=1, sn=False, bias=True) -> nn.Conv2d:
    """Build a convolution whose padding keeps the size (stride 1) or halves it (stride 2)."""
    padding = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation=dilation, bias=bias)
    return spectral_norm(conv) if sn else conv


class Zero(nn.Module):
    """The `none` operation. Mixed edges skip it instead of multiplying zeros."""

    def forward(self, x):
        return x.mul(0.0)


class PreActConv(nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride, dilation, sn, preact):
        layers = [nn.ReLU()] if preact else []
        layers.append(conv2d(c_in, c_out, kernel, stride, dilation, sn))
        super().__init__(*layers)
        self.kernel, self.dilation, self.preact = kernel, dilation, preact


class InterpolateConv(nn.Module):
    """Up-sample by 2 with `mode`, then a 1x1 conv to the output channels."""

    def __init__(self, c_in, c_out, mode, sn, preact):
        super().__init__()
        self.mode, self.preact = mode, preact
        self.conv = conv2d(c_in, c_out, 1, sn=sn)

    def forward(self, x):
        if self.preact:
            x = F.relu(x)
        kwargs = {} if self.mode == "nearest" else {"align_corners": False}
        return self.conv(F.interpolate(x, scale_factor=2, mode=self.mode, **kwargs))


class TransposedConv(nn.Module):
    """Transposed conv 3x3, stride 2: exactly doubles the size."""

    def __init__(self, c_in, c_out, sn, preact):
        super().__init__()
        self.preact = preact
        deconv = nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)
        self.deconv = spectral_norm(deconv) if sn else deconv

    def forward(self, x):
        return self.deconv(F.relu(x) if self.preact else x)


def _same_channels(name: str, build: Callable[[], nn.Module]):
    def make(c_in, c_out, sn, preact):
        if c_in != c_out:
            raise ValueError(f"{name} keeps the channel count; got {c_in} -> {c_out}")
        return build()

    return make


def _conv(kernel: int, dilation: int, stride: int) -> OpSpec:
    def build(c_in, c_out, sn, preact):
        return PreActConv(c_in, c_out, kernel, stride, dilation, sn, preact)

    return OpSpec(build, maps_channels=True, conv=(kernel, dilation))


NORMAL_OPS.add("none", OpSpec(_same_channels("none", Zero), maps_channels=False))
NORMAL_OPS.add("skip_connect", OpSpec(_same_channels("skip_connect", nn.Identity), False))
NORMAL_OPS.add("conv_1x1", _conv(1, 1, stride=1))
NORMAL_OPS.add("conv_3x3", _conv(3, 1, stride=1))
NORMAL_OPS.add("conv_5x5", _conv(5, 1, stride=1))
NORMAL_OPS.add("dil_conv_3x3", _conv(3, 2, stride=1))
NORMAL_OPS.add("dil_conv_5x5", _conv(5, 2, stride=1))

UP_OPS.add("deconv", OpSpec(lambda ci, co, sn, pre: TransposedConv(ci, co, sn, pre), True))
UP_OPS.add(
    "nearest", OpSpec(lambda ci, co, sn, pre: InterpolateConv(ci, co, "nearest", sn, pre), True)
)
UP_OPS.add(
    "bilinear", OpSpec(lambda ci, co, sn, pre: InterpolateConv(ci, co, "bilinear", sn, pre), True)
)

# ceil_mode makes the pools round odd widths up as the stride-2 convolutions do (3 -> 2), so
# every down operation gives the same shape; img_size 24 reaches the last cell at width 3.
DOWN_OPS.add(
    "avg_pool", OpSpec(_same_channels("avg_pool", lambda: nn.AvgPool2d(2, ceil_mode=True)), False)
)
DOWN_OPS.add(
    "max_pool", OpSpec(_same_channels("max_pool", lambda: nn.MaxPool2d(2, ceil_mode=True)), False)
)
DOWN_OPS.add("conv_3x3", _conv(3, 1, stride=2))
DOWN_OPS.add("conv_5x5", _conv(5, 1, stride=2))
DOWN_OPS.add("dil_conv_3x3", _conv(3, 2, stride=2))
DOWN_OPS.add("dil_conv_5x5", _conv(5, 2, stride=2))


def build_op(family: str, name: str, c_in: int, c_out: int, sn: bool, preact: bool) -> nn.Module:
    return FAMILIES[family].get(name).build(c_in, c_out, sn, preact)


def is_none(name: str) -> bool:
    return name == "none"


__all__ = ["DOWN_OPS", "FAMILIES", "NORMAL_OPS", "UP_OPS", "OpSpec", "build_op"]
