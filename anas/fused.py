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

Parameters stay in the MixedEdge modules, so both paths share one state_dict and give the same
outputs and gradients up to float rounding.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from anas.ops import FAMILIES, InterpolateConv, PreActConv, TransposedConv

STRIDE = {"normal": 1, "down": 2}


def _conv_layer(op: PreActConv):
    return op[-1]


def edge_outputs(family: str, edges: Sequence, weights: Sequence[torch.Tensor], x: torch.Tensor):
    """Outputs of MixedEdge modules `edges` that all read `x`; weights[i] has shape (ops,)."""
    if family == "up":
        outputs = _up_outputs(edges, weights, x)
    else:
        outputs = _conv_outputs(family, edges, weights, x)
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


def _conv_outputs(family, edges, weights, x):
    """Merged convolution candidates, one conv per dilation for all edges together."""
    stride = STRIDE[family]
    registry = FAMILIES[family]
    # dilation -> per edge list of (weight, conv layer, kernel); the preact flag is shared by
    # every convolution of a cell's source, so the first one decides.
    by_dilation: dict[int, list[list]] = {}
    preact = None
    for e, edge in enumerate(edges):
        for name, op in edge.ops.items():
            if not isinstance(op, PreActConv):
                continue
            kernel, dilation = registry.get(name).conv
            preact = op.preact
            terms = by_dilation.setdefault(dilation, [[] for _ in edges])
            terms[e].append((weights[e][edge.index[name]], _conv_layer(op), kernel))
    outputs = [None] * len(edges)
    if not by_dilation:
        return outputs
    inp = F.relu(x) if preact else x
    c_out = None
    bias = [None] * len(edges)
    merged = []
    for dilation, per_edge in sorted(by_dilation.items()):
        size = max(k for terms in per_edge for _, _, k in terms)
        kernels = []
        for e, terms in enumerate(per_edge):
            kernel = None
            for w, conv, k in terms:
                c_out = conv.out_channels
                p = (size - k) // 2
                term = w * F.pad(conv.weight, (p, p, p, p))
                kernel = term if kernel is None else kernel + term
                if conv.bias is not None:
                    b = w * conv.bias
                    bias[e] = b if bias[e] is None else bias[e] + b
            if kernel is None:  # this edge has no convolution of this dilation
                kernel = x.new_zeros(c_out, inp.shape[1], size, size)
            kernels.append(kernel)
        weight = torch.cat(kernels, dim=0)  # (edges * c_out, c_in, size, size)
        weight, padding = _crop_dead_taps(weight, dilation, inp.shape[-2:])
        merged.append(F.conv2d(inp, weight, None, stride, padding, dilation))
    total = merged[0] if len(merged) == 1 else sum(merged[1:], merged[0])
    for e, part in enumerate(total.split(c_out, dim=1)):  # each (B, c_out, H', W')
        if bias[e] is not None:
            part = part + bias[e].view(1, -1, 1, 1)
        outputs[e] = part
    return outputs


def _crop_dead_taps(weight: torch.Tensor, dilation: int, size) -> tuple[torch.Tensor, tuple]:
    """Drop kernel taps that only ever read padding, with the padding they needed.

    A tap at offset t * dilation from the centre reads inside an input of height H only if
    |t * dilation| <= H - 1, for stride 1 and for stride 2 alike (output positions are centred
    on input positions). On the small maps of the first generator and last discriminator cells a
    dilated 5x5 kernel is mostly such taps: at 2x2 it is exactly a 1x1 convolution. The output
    shape and values are unchanged.
    """
    radius = weight.shape[-1] // 2
    keep = [min(radius, (n - 1) // dilation) for n in size]
    if keep[0] < radius or keep[1] < radius:
        rows = slice(radius - keep[0], radius + keep[0] + 1)
        cols = slice(radius - keep[1], radius + keep[1] + 1)
        # A slice has neither layout; copy it into the input's so the kernel is not reordered.
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
