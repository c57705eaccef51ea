"""The supernet's fast path: all candidate operations of the edges leaving one node, run as a
few merged kernels instead of one kernel per candidate.

The mathematics is that of MixedEdge: each edge outputs sum_k w_k * op_k(x). Convolutions are
linear in their kernels, and every convolution candidate of a node's outgoing edges reads the
same ReLU(x), so

    sum_k w_k * conv(ReLU(x), W_k) + w_k * b_k  =  conv(ReLU(x), sum_k w_k * pad(W_k)) + sum_k w_k * b_k

where pad() centres a smaller kernel inside the largest one of the same dilation. Candidates
with dilation 1 (1x1, 3x3, 5x5) become one 5x5 convolution and those with dilation 2 (3x3, 5x5)
one dilated 5x5 convolution: 50 taps instead of 69, and two kernels instead of five. The
kernels of all edges leaving the node are stacked along the output channels, so the node runs
two convolutions whatever its number of edges. Up-sampling edges merge the same way: one
transposed convolution for every edge, and one 1x1 convolution over the nearest and bilinear
up-samplings side by side. Everything else (identity, pools, operations registered later) runs
as in MixedEdge, one term per candidate, and `none` costs nothing.

Building the merged kernels one candidate at a time costs a few small tensor operations per
candidate, and a supernet has hundreds of candidates, so at small widths that bookkeeping
rivals the convolutions themselves. `MergedConvs` therefore works on a whole network at once:
`pack` stacks every convolution candidate's kernel (spectrally normalised in one batched power
iteration where the network requests it) into one matrix per input width, and `kernels`
scales each row by its candidate's mixing weight and sums the rows of each merged kernel with
one index_add. A search update packs once and mixes once, whatever the number of forward passes
it makes.

Parameters stay in the MixedEdge modules, so both paths share one state_dict and give the same
outputs and gradients up to float rounding.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anas.ops import FAMILIES, InterpolateConv, PreActConv, TransposedConv
from anas.topology import edge_groups

STRIDE = {"normal": 1, "down": 2}


@dataclass
class SourceKernels:
    """The merged convolutions of the edges leaving one node, for one set of mixing weights."""

    convs: list[tuple[torch.Tensor, int, int]]  # (kernel (edges * c_out, c_in, k, k), dilation, k)
    bias: torch.Tensor | None  # (edges * c_out,), added once
    stride: int
    preact: bool
    c_out: int
    layout: torch.memory_format  # that of the packed kernels

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return each edge's convolution terms, (B, c_out, H', W') per edge."""
        inp = F.relu(x) if self.preact else x
        total = None
        for kernel, dilation, size in self.convs:
            bias = self.bias if total is None else None
            if self.stride > 1 and dilation % self.stride == 0:
                # With the dilation a multiple of the stride every tap reads a row and column
                # that are multiples of the stride, so the convolution is a stride-1 one over
                # that subsample, with the dilation divided by the stride. The same output,
                # and oneDNN's stride-1 kernels ran 2.5x to 3x faster than the stride-2 dilated
                # ones on a 2-core x86 CPU (16 channels, 8 to 32 px, forward and backward).
                step = self.stride
                sub = _subsample(inp, step)
                kernel, padding = _crop_dead_taps(kernel, dilation // step, size, sub.shape[-2:])
                out = F.conv2d(sub, kernel, bias, 1, padding, dilation // step)
            elif self.stride == 1 and dilation == 2 and kernel.requires_grad and _small(inp):
                out = _conv_by_parity(inp, kernel, bias, size)
            else:
                kernel, padding = _crop_dead_taps(kernel, dilation, size, inp.shape[-2:])
                out = F.conv2d(inp, kernel, bias, self.stride, padding, dilation)
            total = out if total is None else total + out
        # A 1-channel image is both contiguous and channels-last, and convolutions of it come
        # out contiguous. The rest of the network must not mix layouts (see anas.networks).
        total = total.contiguous(memory_format=self.layout)
        return list(total.split(self.c_out, dim=1))


# Largest map on which a dilated convolution whose kernel needs a gradient runs by parity
# (_conv_by_parity). oneDNN's weight gradient for dilation 2 took 2.8 ms against 1.0 ms by
# parity at 8x8 px (16 channels, batch 32, one thread of a 2-core x86 CPU). At 16x16 px parity
# lost, 2.6 ms against 2.1 ms.
PARITY_MAX_SIDE = 8


def _subsample(x: torch.Tensor, step: int) -> torch.Tensor:
    """Return x[..., ::step, ::step], slicing a channels-last x in its (B, H, W, C) view.

    The gradient of a slice is a zero-filled buffer in the contiguous layout of the sliced
    tensor, so this way it comes out channels-last, like every other gradient reaching x.
    """
    b, c, h, w = x.shape
    if h % step or w % step or not x.is_contiguous(memory_format=torch.channels_last):
        return x[..., ::step, ::step]
    nhwc = x.permute(0, 2, 3, 1).reshape(b, h // step, step, w // step, step, c)  # a view
    return nhwc[:, :, 0, :, 0].permute(0, 3, 1, 2)


def _small(x: torch.Tensor) -> bool:
    h, w = x.shape[-2:]
    return h % 2 == 0 and w % 2 == 0 and max(h, w) <= PARITY_MAX_SIDE


def _conv_by_parity(inp, kernel, bias, size) -> torch.Tensor:
    """Stride-1 convolution with dilation 2 as an undilated one over the 2x2 parity sub-images.

    A tap at an even offset connects pixels of the same row and column parity, so the four
    sub-images (even rows and even columns, even rows and odd columns, and so on) convolve
    independently with the undilated kernel. They run as one batch 4x as large.
    """
    b, c, h, w = inp.shape
    sub = (
        inp.permute(0, 2, 3, 1)  # (b, h, w, c)
        .reshape(b, h // 2, 2, w // 2, 2, c)
        .permute(0, 2, 4, 1, 3, 5)  # (b, row parity, column parity, h / 2, w / 2, c)
        .reshape(4 * b, h // 2, w // 2, c)
        .permute(0, 3, 1, 2)  # (4b, c, h / 2, w / 2) in channels-last layout
    )
    kernel, padding = _crop_dead_taps(kernel, 1, size, sub.shape[-2:])
    out = F.conv2d(sub, kernel, bias, 1, padding)
    c_out = out.shape[1]
    return (
        out.permute(0, 2, 3, 1)
        .reshape(b, 2, 2, h // 2, w // 2, c_out)
        .permute(0, 3, 1, 4, 2, 5)  # (b, h / 2, row parity, w / 2, column parity, c_out)
        .reshape(b, h, w, c_out)
        .permute(0, 3, 1, 2)
    )


@dataclass
class _Source:
    cell: int
    name: str  # "x" or a node name
    n_edges: int
    dilations: list[tuple[int, int]]  # (dilation, largest kernel of that dilation)
    stride: int
    preact: bool


@dataclass
class _Member:
    """One convolution candidate: where its kernel goes and which weight scales it."""

    conv: nn.Conv2d
    kernel: int
    slot: int  # merged kernel it is summed into; slots run by source, dilation, then edge
    edge: int  # edge whose bias it adds to, numbered by source, then edge
    position: int  # index of its mixing weight in the flat weights MergedConvs.kernels builds


@dataclass
class PackedBank:
    """One bank's kernels for one update: weights (members, c_out * k * k * c_in) in the
    kernels' memory order, biases (members, c_out)."""

    weights: torch.Tensor
    biases: torch.Tensor


class _Bank:
    """The convolution candidates of a network that read `c_in` channels.

    Members are kept sorted by kernel size, so same-shape kernels stack into one tensor for
    their batched spectral normalisation.
    """

    def __init__(self, c_in: int):
        self.c_in = c_in
        self.members: list[_Member] = []
        self.sources: list[_Source] = []
        self.n_slots = 0
        self.n_edges = 0
        self.index: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def size(self) -> int:
        """Side of the packed kernels: the largest candidate kernel."""
        return max(member.kernel for member in self.members)

    @property
    def channels_last(self) -> bool:
        largest = max(self.members, key=lambda member: member.kernel)
        return _original(largest.conv).is_contiguous(memory_format=torch.channels_last)

    def groups(self) -> list[tuple[int, list[nn.Conv2d]]]:
        """Member layers by kernel size, in member order."""
        out: dict[int, list[nn.Conv2d]] = {}
        for member in self.members:
            out.setdefault(member.kernel, []).append(member.conv)
        return list(out.items())

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per member, as tensors on `device`: its slot, its edge and its mixing weight's index."""
        if device not in self.index:
            columns = [(m.slot, m.edge, m.position) for m in self.members]
            table = torch.tensor(columns, dtype=torch.long).T.contiguous().to(device)
            self.index[device] = tuple(table)
        return self.index[device]


def _original(conv: nn.Conv2d) -> torch.Tensor:
    """The trainable kernel: the unnormalised one under spectral normalisation."""
    if hasattr(conv, "parametrizations"):
        return conv.parametrizations.weight.original
    return conv.weight


class MergedConvs:
    """Every mergeable convolution candidate of a supernet's cells, planned once at build time.

    `cells` are anas.networks.Cell supernet cells. Sources whose edges offer no convolution, and
    up-sampling edges, are left to `edge_outputs`.
    """

    def __init__(self, network: str, cells: Sequence[nn.Module]):
        # Offsets of each (cell, edge group) in the flat mixing weights `kernels` builds.
        self.order: list[tuple[int, str]] = []
        offsets, total = {}, 0
        for i in range(len(cells)):
            for group in edge_groups(network, i):
                self.order.append((i, group.name))
                offsets[(i, group.name)] = total
                total += len(group.edges) * len(group.ops)
        self.frozen: dict[int, PackedBank] | None = None  # set by anas.search.weights_once
        self.banks: dict[int, _Bank] = {}
        for i, cell in enumerate(cells):
            for source, edges in cell.out_edges.items():
                if edges[0].family in STRIDE:
                    self._plan_source(i, cell, source, edges, offsets)
        for bank in self.banks.values():
            bank.members.sort(key=lambda member: member.kernel)

    def _plan_source(self, i, cell, source, edges, offsets) -> None:
        registry = FAMILIES[edges[0].family]
        # Per edge: (conv layer, kernel, dilation, index of its mixing weight).
        terms = []
        for edge in edges:
            mixed = cell.edges[edge.name]
            group, row = cell.rows[edge.name]
            base = offsets[(i, group)] + row * len(mixed.names)
            terms.append(
                [
                    (op[-1], *registry.get(name).conv, base + mixed.index[name])
                    for name, op in mixed.ops.items()
                    if isinstance(op, PreActConv)
                ]
            )
        if not any(terms):
            return
        first = next(
            op for op in cell.edges[edges[0].name].ops.values() if isinstance(op, PreActConv)
        )
        bank = self.banks.setdefault(first[-1].in_channels, _Bank(first[-1].in_channels))
        dilations = sorted({d for edge_terms in terms for _, _, d, _ in edge_terms})
        sizes = {d: max(k for t in terms for _, k, dd, _ in t if dd == d) for d in dilations}
        for j, d in enumerate(dilations):
            for e, edge_terms in enumerate(terms):
                for conv, k, dilation, position in edge_terms:
                    if dilation == d:
                        slot = bank.n_slots + j * len(edges) + e
                        bank.members.append(_Member(conv, k, slot, bank.n_edges + e, position))
        bank.sources.append(
            _Source(
                cell=i,
                name=source,
                n_edges=len(edges),
                dilations=[(d, sizes[d]) for d in dilations],
                stride=STRIDE[edges[0].family],
                preact=first.preact,
            )
        )
        bank.n_slots += len(dilations) * len(edges)
        bank.n_edges += len(edges)

    def spectral_norm_modules(self) -> list[nn.Module]:
        """The layers whose spectral normalisation `pack` computes instead of parametrize."""
        return [
            member.conv
            for bank in self.banks.values()
            for member in bank.members
            if hasattr(member.conv, "parametrizations")
        ]

    def pack(self) -> dict[int, PackedBank]:
        """Stack every candidate's kernel, padded to the bank's size, for one update.

        Spectrally normalised layers run their power iteration here (in training mode, as
        parametrize would), batched over same-shape kernels, and keep their state in the layers'
        own buffers. Gradients flow to the layers' parameters if grad mode is on.
        """
        packed = {}
        for c_in, bank in self.banks.items():
            size, channels_last = bank.size, bank.channels_last
            parts = []
            for k, convs in bank.groups():
                kernels = torch.stack([_original(conv) for conv in convs])
                if channels_last:
                    # Stacking keeps each kernel's strides, so in the order of memory,
                    # (n, c_out, k, k, c_in), the stack is contiguous and needs no copy.
                    kernels = kernels.permute(0, 1, 3, 4, 2)
                if hasattr(convs[0], "parametrizations"):
                    kernels = _spectral_normalize(kernels, convs, channels_last)
                pad = (size - k) // 2
                if pad:
                    sides = (0, 0, pad, pad, pad, pad) if channels_last else (pad,) * 4
                    kernels = F.pad(kernels, sides)
                parts.append(kernels)
            kernels = torch.cat(parts) if len(parts) > 1 else parts[0]
            biases = torch.stack([member.conv.bias for member in bank.members])
            packed[c_in] = PackedBank(kernels.reshape(len(bank.members), -1), biases)
        return packed

    def kernels(
        self, weights: Sequence[dict], packed: dict[int, PackedBank] | None = None
    ) -> list[dict[str, SourceKernels]]:
        """Merged convolutions per cell and source for mixing weights `weights` (one dict per
        cell, as anas.networks.mixing_weights returns). `packed` defaults to `frozen` if set,
        else to a fresh packing."""
        if packed is None:
            packed = self.frozen if self.frozen is not None else self.pack()
        flat = torch.cat([weights[i][group].reshape(-1) for i, group in self.order])
        out: list[dict[str, SourceKernels]] = [{} for _ in weights]
        for c_in, bank in self.banks.items():
            slots, edges, positions = bank.indices(flat.device)
            scale = flat[positions].unsqueeze(1)  # (members, 1)
            weight, bias = packed[c_in].weights, packed[c_in].biases
            # Each member belongs to one slot, so summing scaled rows by slot merges them.
            merged = weight.new_zeros(bank.n_slots, weight.shape[1])
            merged = merged.index_add(0, slots, weight * scale)  # (slots, c_out * k * k * c_in)
            bias = bias.new_zeros(bank.n_edges, bias.shape[1]).index_add(0, edges, bias * scale)
            c_out, size = bias.shape[1], bank.size
            layout = torch.channels_last if bank.channels_last else torch.contiguous_format
            if bank.channels_last:
                merged = merged.view(-1, c_out, size, size, c_in).permute(0, 1, 4, 2, 3)
            else:
                merged = merged.view(-1, c_out, c_in, size, size)
            # One split per tensor, not a slice per source: the backward pass of a split is
            # one concatenation, that of each slice a zero-filled copy of the whole tensor.
            slot_kernels = merged.split([s.n_edges for s in bank.sources for _ in s.dilations])
            edge_biases = bias.split([s.n_edges for s in bank.sources])
            slot = 0
            for source, source_bias in zip(bank.sources, edge_biases, strict=True):
                e = source.n_edges
                convs = []
                for dilation, k in source.dilations:
                    kernel = slot_kernels[slot].reshape(e * c_out, c_in, size, size)
                    convs.append((kernel, dilation, k))
                    slot += 1
                out[source.cell][source.name] = SourceKernels(
                    convs, source_bias.reshape(-1), source.stride, source.preact, c_out, layout
                )
        return out


def _spectral_normalize(kernels: torch.Tensor, convs: Sequence[nn.Module], channels_last: bool):
    """Divide each of n stacked kernels by its largest singular value, estimated as
    torch.nn.utils.parametrizations.spectral_norm does (dim 0, same power iteration and eps);
    updates the layers' `_u` and `_v` buffers in training mode.

    `kernels` is (n, c_out, c_in, k, k), or (n, c_out, k, k, c_in) with `channels_last`. The
    singular values do not depend on the order of a matrix's columns, so the second layout only
    reorders each `_v` to match.
    """
    norms = [conv.parametrizations.weight[0] for conv in convs]
    first = norms[0]
    n, c_out = kernels.shape[:2]
    u = torch.stack([norm._u for norm in norms])  # (n, c_out)
    v = torch.stack([norm._v for norm in norms])  # (n, c_in * k * k) in parametrize's order
    if channels_last:
        c_in, k = kernels.shape[-1], kernels.shape[-2]
        v = v.view(n, c_in, k, k).permute(0, 2, 3, 1).reshape(n, -1)
    matrices = kernels.reshape(n, c_out, -1)
    if first.training:
        with torch.no_grad():
            detached = matrices.detach()
            for _ in range(first.n_power_iterations):
                # Batched matrix-vector products as multiply-and-sum: bmm with one column is
                # several times slower on CPU at these sizes.
                u = F.normalize((detached * v.unsqueeze(1)).sum(2), dim=1, eps=first.eps)
                v = F.normalize((detached * u.unsqueeze(2)).sum(1), dim=1, eps=first.eps)
            stored = v
            if channels_last:
                stored = v.view(n, k, k, c_in).permute(0, 3, 1, 2).reshape(n, -1)
            torch._foreach_copy_([norm._u for norm in norms], list(u.unbind(0)))
            torch._foreach_copy_([norm._v for norm in norms], list(stored.unbind(0)))
    sigma = (u * (matrices * v.unsqueeze(1)).sum(2)).sum(1)  # (n,)
    return kernels / sigma.view(-1, *[1] * (kernels.dim() - 1))


def edge_outputs(
    family: str,
    edges: Sequence,
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    merged: SourceKernels | None,
):
    """Outputs of MixedEdge modules `edges` that all read `x`; weights[i] has shape (ops,).
    `merged` holds the edges' merged convolutions (None for up-sampling edges)."""
    if family == "up":
        outputs = _up_outputs(edges, weights, x)
    elif merged is not None:
        outputs = merged(x)
    else:
        outputs = [None] * len(edges)
    # Candidates without a merged form: one weighted term each.
    for i, (edge, w) in enumerate(zip(edges, weights, strict=True)):
        for name, op in edge.ops.items():
            if _merged(family, op):
                continue
            term = w[edge.index[name]] * op(x)
            outputs[i] = term if outputs[i] is None else outputs[i] + term
    return outputs


def _merged(family: str, op) -> bool:
    if family == "up":
        return isinstance(op, TransposedConv | InterpolateConv)
    return isinstance(op, PreActConv)


def _crop_dead_taps(weight: torch.Tensor, dilation: int, kernel: int, size) -> tuple:
    """Cut a packed kernel down to the taps that can read the input, with the padding they need.

    The packed kernel is centred and as large as the bank's largest candidate; `kernel` is the
    largest candidate of this dilation, so taps beyond its radius are zero. A tap at offset
    t * dilation from the centre reads inside an input of height H only if |t * dilation| <=
    H - 1, for stride 1 and for stride 2 alike (output positions are centred on input
    positions). On the small maps of the first generator and last discriminator cells a dilated
    5x5 kernel is mostly such taps: at 2x2 it is exactly a 1x1 convolution. The output shape and
    values are unchanged.
    """
    full = weight.shape[-1] // 2
    radius = kernel // 2
    keep = [min(radius, (n - 1) // dilation) for n in size]
    if keep[0] < full or keep[1] < full:
        rows = slice(full - keep[0], full + keep[0] + 1)
        cols = slice(full - keep[1], full + keep[1] + 1)
        # A slice has neither layout; copy it into the packed one so the kernel is not reordered.
        layout = (
            torch.channels_last
            if weight.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        weight = weight[..., rows, cols].contiguous(memory_format=layout)
    return weight, (dilation * keep[0], dilation * keep[1])


def _up_outputs(edges, weights, x):
    """Merged up-sampling candidates: one transposed conv and one 1x1 conv for all edges."""
    outputs = [None] * len(edges)
    deconv_w, deconv_b = [], []
    interp = {}  # mode -> list per edge of (weight, conv)
    preact = None
    for e, edge in enumerate(edges):
        for name, op in edge.ops.items():
            w = weights[e][edge.index[name]]
            preact = op.preact if preact is None else preact
            if isinstance(op, TransposedConv):
                deconv_w.append(w * op.deconv.weight)  # (c_in, c_out, 3, 3)
                deconv_b.append(w * op.deconv.bias)
            elif isinstance(op, InterpolateConv):
                interp.setdefault(op.mode, [None] * len(edges))[e] = (w, op.conv)
    inp = F.relu(x) if preact else x
    c_out = None
    parts = []
    if deconv_w:
        if len(deconv_w) != len(edges):
            raise ValueError("every up-sampling edge must offer deconv for the merged path")
        weight = torch.cat(deconv_w, dim=1)  # (c_in, edges * c_out, 3, 3)
        c_out = weight.shape[1] // len(edges)
        out = F.conv_transpose2d(inp, weight, torch.cat(deconv_b), 2, 1, 1)
        parts.append(out)
    if interp:
        modes = sorted(interp)
        ups = []
        for mode in modes:
            kwargs = {} if mode == "nearest" else {"align_corners": False}
            ups.append(F.interpolate(inp, scale_factor=2, mode=mode, **kwargs))
        stacked = torch.cat(ups, dim=1)  # (B, modes * c_in, 2H, 2W)
        rows, biases = [], []
        for e in range(len(edges)):
            blocks, b_sum = [], None
            for mode in modes:
                w, conv = interp[mode][e]
                blocks.append(w * conv.weight)  # (c_out, c_in, 1, 1)
                b = w * conv.bias
                b_sum = b if b_sum is None else b_sum + b
            rows.append(torch.cat(blocks, dim=1))
            biases.append(b_sum)
        weight = torch.cat(rows, dim=0)  # (edges * c_out, modes * c_in, 1, 1)
        c_out = weight.shape[0] // len(edges)
        parts.append(F.conv2d(stacked, weight, torch.cat(biases)))
    if not parts:
        return outputs
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return list(total.split(c_out, dim=1))
