"""The generator and discriminator, as supernets (every candidate on every edge, mixed by
architecture weights) or as derived networks (one operation per edge, from a genotype).

Shapes: images are (batch, channels, height, width). Architecture weights are stored per cell and
per edge group (anas.topology.edge_groups) as tensors of logits of shape (edges, ops), in a
ParameterDict called `alpha` for the generator and `beta` for the discriminator.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from anas import fused
from anas.errors import ConfigError
from anas.genotypes import Genotype
from anas.ops import build_op
from anas.topology import EDGES, NUM_CELLS, OUTPUT_NODE, candidates, edge_groups, node_inputs

CellWeights = Mapping[str, torch.Tensor]  # edge group name -> mixing weights (edges, ops)


def check_image_shape(img_size: int, img_channels: int) -> None:
    if img_size < 16 or img_size % 8:
        raise ConfigError(f"data.img_size: expected a multiple of 8 from 16 up, got {img_size}")
    if img_channels not in (1, 3):
        raise ConfigError(f"data.channels: expected 1 or 3, got {img_channels}")


class MixedEdge(nn.Module):
    """All candidate operations of one edge; the output is their sum weighted by `weights` (ops,).

    `none` is skipped rather than multiplied: it contributes nothing to the sum, yet its weight
    still receives a gradient through the softmax that normalises the others.
    """

    def __init__(
        self, family: str, ops: Sequence[str], c_in: int, c_out: int, sn: bool, preact: bool
    ):
        super().__init__()
        self.names = list(ops)
        self.ops = nn.ModuleDict(
            {
                name: build_op(family, name, c_in, c_out, sn, preact)
                for name in ops
                if name != "none"
            }
        )
        self.index = {name: k for k, name in enumerate(self.names)}

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for name, op in self.ops.items():
            term = weights[self.index[name]] * op(x)
            out = term if out is None else out + term
        return out


class Cell(nn.Module):
    """One cell of either network, wired by anas.topology.

    With `genotype_cell` None each edge is a MixedEdge; otherwise each edge is the one operation
    the genotype names, and `none` edges are left out.
    """

    def __init__(self, network, index, c_in, c_out, genotype_cell=None, sn=False):
        super().__init__()
        self.network, self.index = network, index
        self.nodes = node_inputs(network)
        self.output = OUTPUT_NODE[network]
        self.edges = nn.ModuleDict()
        # Edge name -> (edge group, row) addressing its mixing weights.
        self.rows = {
            edge.name: (group.name, row)
            for group in edge_groups(network, index)
            for row, edge in enumerate(group.edges)
        }
        for edge in EDGES[network]:
            edge_in = c_in if edge.source == "x" else c_out
            # The discriminator's first cell reads the image: a ReLU there would drop every
            # negative pixel, so its convolutions start without one.
            preact = not (network == "discriminator" and index == 0 and edge.source == "x")
            if genotype_cell is None:
                ops = candidates(network, index, edge)
                self.edges[edge.name] = MixedEdge(edge.family, ops, edge_in, c_out, sn, preact)
            elif genotype_cell[edge.name] != "none":
                op = genotype_cell[edge.name]
                self.edges[edge.name] = build_op(edge.family, op, edge_in, c_out, sn, preact)
        # Supernet edges leaving each source, which the network merges into few kernels
        # (anas.fused) when every source's edges share one candidate list.
        self.out_edges: dict[str, list] = {}
        for edge in EDGES[network]:
            self.out_edges.setdefault(edge.source, []).append(edge)
        self.mergeable = genotype_cell is None and all(
            len({(e.family, tuple(self.edges[e.name].names)) for e in edges}) == 1
            for edges in self.out_edges.values()
        )

    def _forward_fused(self, x, weights: CellWeights, extra, kernels) -> dict[str, torch.Tensor]:
        values, outputs = {"x": x}, {}
        rows_of = {group: table.unbind(0) for group, table in weights.items()}  # one op per group

        def run_edges_from(source: str) -> None:
            edges = self.out_edges.get(source, [])
            if not edges:
                return
            modules = [self.edges[e.name] for e in edges]
            rows = [rows_of[self.rows[e.name][0]][self.rows[e.name][1]] for e in edges]
            merged = kernels.get(source)
            results = fused.edge_outputs(edges[0].family, modules, rows, values[source], merged)
            outputs.update(zip((e.name for e in edges), results, strict=True))

        run_edges_from("x")
        for node, edges in self.nodes.items():
            total = extra.get(node) if extra else None
            for edge in edges:
                term = outputs[edge.name]
                total = term if total is None else total + term
            values[node] = total
            run_edges_from(node)
        return values

    def forward(
        self, x, weights: CellWeights | None = None, extra=None, kernels=None
    ) -> dict[str, torch.Tensor]:
        """Return every node's value; `extra` maps node names to tensors added to that node.

        With `kernels` (this cell's entry of anas.fused.MergedConvs.kernels) the supernet runs
        merged; otherwise every candidate runs on its own (MixedEdge).
        """
        if weights is not None and kernels is not None:
            return self._forward_fused(x, weights, extra, kernels)
        values = {"x": x}
        for node, edges in self.nodes.items():
            total = extra.get(node) if extra else None
            for edge in edges:
                if edge.name not in self.edges:
                    continue
                if weights is None:
                    term = self.edges[edge.name](values[edge.source])
                else:
                    group, row = self.rows[edge.name]
                    term = self.edges[edge.name](values[edge.source], weights[group][row])
                total = term if total is None else total + term
            values[node] = total
        return values


class CellNetwork(nn.Module):
    """Base of the generator and discriminator. As supernets they run their cells' convolution
    candidates as merged kernels; `fused` False runs every candidate separately (MixedEdge), the
    straightforward formulation that the merged path is tested against."""

    def _plan_merging(self) -> None:
        supernet = self.genotype is None and all(cell.mergeable for cell in self.cells)
        self.merged = fused.MergedConvs(self.network, self.cells) if supernet else None
        self.fused = self.merged is not None

    def pack(self) -> dict | None:
        """The packed kernels of anas.fused.MergedConvs.pack, or None when not fused."""
        return self.merged.pack() if self.fused else None

    def merged_kernels(self, weights: list[dict], packed=None) -> list[dict] | None:
        """Merged convolutions for mixing weights `weights`, or None when not fused; `packed`
        (from `pack`) lets several calls share one packing."""
        if not self.fused or weights is None:
            return None
        return self.merged.kernels(weights, packed)


def init_arch_weights(network: str, scale: float = 1e-3) -> nn.ParameterDict:
    """Small random logits, so every candidate starts almost equally weighted."""
    params = {}
    for i in range(NUM_CELLS[network]):
        for group in edge_groups(network, i):
            shape = (len(group.edges), len(group.ops))
            params[f"cell{i}_{group.name}"] = nn.Parameter(scale * torch.randn(shape))
    return nn.ParameterDict(params)


def mixing_weights(arch: nn.ParameterDict, network: str, tau=None, rng=None) -> list[dict]:
    """Per cell, per edge group: softmax over each edge's candidates, shape (edges, ops).

    With `tau` set the weights are a Gumbel-softmax sample at that temperature, drawn with the
    torch.Generator `rng` so a seeded search repeats exactly. One draw covers every group of the
    network, in the order of `arch`, because a supernet asks for these weights several times
    per update and per-group draws cost more than the arithmetic.
    """
    names = [
        (i, group.name) for i in range(NUM_CELLS[network]) for group in edge_groups(network, i)
    ]
    logits = [arch[f"cell{i}_{name}"] for i, name in names]
    if tau is not None:
        flat = torch.cat([table.reshape(-1) for table in logits])
        uniform = torch.rand(flat.shape, generator=rng, device=flat.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
        parts = ((flat + gumbel) / tau).split([table.numel() for table in logits])
        logits = [part.view(table.shape) for part, table in zip(parts, logits, strict=True)]
    cells = [{} for _ in range(NUM_CELLS[network])]
    for (i, name), table in zip(names, logits, strict=True):
        cells[i][name] = torch.softmax(table, dim=-1)
    return cells


def arch_tables(arch: nn.ParameterDict, network: str) -> list[dict[str, torch.Tensor]]:
    """Regroup the raw logits per cell, in the form anas.genotypes.derive reads."""
    return [
        {g.name: arch[f"cell{i}_{g.name}"] for g in edge_groups(network, i)}
        for i in range(NUM_CELLS[network])
    ]


class Generator(CellNetwork):
    """Three up-cells from a latent vector to an image in [-1, 1].

    The latent vector (batch, latent_dim) is split evenly across the cells; part i is projected
    by a linear layer to (batch, channels, w_i, w_i), w_i = (img_size / 8) * 2**i, and added to
    cell i's input. Each cell doubles the width, so the last one outputs img_size. The node2 of
    every earlier cell reaches later cells' node2 resized and projected by a 1x1 conv.
    """

    network = "generator"

    def __init__(
        self, latent_dim, channels, img_size, img_channels, genotype: Genotype | None = None
    ):
        super().__init__()
        check_image_shape(img_size, img_channels)
        n = NUM_CELLS["generator"]
        if latent_dim % n:
            raise ConfigError(
                f"model.latent_dim: must be divisible by {n} (one part per cell), got {latent_dim}"
            )
        if genotype is not None and genotype.network != "generator":
            raise ConfigError(f"expected a generator genotype, got a {genotype.network} genotype")
        self.latent_dim, self.channels = latent_dim, channels
        self.img_size, self.img_channels = img_size, img_channels
        self.genotype = genotype
        self.widths = [img_size // 8 * 2**i for i in range(n)]
        chunk = latent_dim // n
        self.projections = nn.ModuleList(nn.Linear(chunk, channels * w * w) for w in self.widths)
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(n))
        cells = genotype.cell_dicts if genotype else [None] * n
        self.cells = nn.ModuleList(
            Cell("generator", i, channels, channels, cells[i]) for i in range(n)
        )
        self.skips = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(i)) for i in range(n)
        )
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, img_channels, 3, padding=1),
            nn.Tanh(),
        )
        self.alpha = init_arch_weights("generator") if genotype is None else None
        self._plan_merging()

    @property
    def is_supernet(self) -> bool:
        return self.genotype is None

    @property
    def _layout(self) -> torch.memory_format:
        weight = self.head[2].weight  # (img_channels, C, 3, 3)
        if weight.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format

    def forward(self, z: torch.Tensor, weights: list[dict] | None = None, kernels=None):
        """Images for latent vectors z; a supernet mixes by `weights` (softmax of alpha if None)
        and, when fused, by `kernels` (from merged_kernels, built here if None)."""
        if self.is_supernet and weights is None:
            weights = mixing_weights(self.alpha, "generator")
        if kernels is None:
            kernels = self.merged_kernels(weights)
        parts = z.split(self.latent_dim // len(self.cells), dim=1)
        h, node2s = None, []
        for i, cell in enumerate(self.cells):
            w = self.widths[i]
            projected = self.projections[i](parts[i]).view(-1, self.channels, w, w)  # (B, C, w, w)
            # In the layout of the convolutions (channels-last in the search), so that no
            # elementwise operation mixes layouts, which runs several times slower.
            projected = projected.contiguous(memory_format=self._layout)
            h = projected if h is None else h + projected
            extra = None
            if node2s:
                # Cross-scale skips: earlier node2 outputs resized to this cell's output width.
                resized = [F.interpolate(s, size=2 * w, mode="nearest") for s in node2s]
                extra = {
                    "node2": sum(conv(s) for conv, s in zip(self.skips[i], resized, strict=True))
                }
            nodes = cell(
                self.norms[i](h),
                None if weights is None else weights[i],
                extra,
                None if kernels is None else kernels[i],
            )
            node2s.append(nodes["node2"])
            h = nodes["node3"]  # (B, C, 2w, 2w)
        return self.head(h)


class Discriminator(CellNetwork):
    """Four down-cells, each halving the width, then ReLU, sum pooling and a linear layer to one
    logit; every convolution and the linear layer are spectrally normalised."""

    network = "discriminator"

    def __init__(self, channels, img_size, img_channels, genotype: Genotype | None = None):
        super().__init__()
        check_image_shape(img_size, img_channels)
        if genotype is not None and genotype.network != "discriminator":
            raise ConfigError(
                f"expected a discriminator genotype, got a {genotype.network} genotype"
            )
        self.channels, self.img_size, self.img_channels = channels, img_size, img_channels
        self.genotype = genotype
        n = NUM_CELLS["discriminator"]
        cells = genotype.cell_dicts if genotype else [None] * n
        self.cells = nn.ModuleList(
            Cell(
                "discriminator",
                i,
                img_channels if i == 0 else channels,
                channels,
                cells[i],
                sn=True,
            )
            for i in range(n)
        )
        self.linear = spectral_norm(nn.Linear(channels, 1))
        self.beta = init_arch_weights("discriminator") if genotype is None else None
        self._plan_merging()

    @property
    def is_supernet(self) -> bool:
        return self.genotype is None

    def forward(self, x: torch.Tensor, weights: list[dict] | None = None, kernels=None):
        """Logits (B,) for images x; `weights` and `kernels` as in Generator.forward."""
        if self.is_supernet and weights is None:
            weights = mixing_weights(self.beta, "discriminator")
        if kernels is None:
            kernels = self.merged_kernels(weights)
        h = x
        for i, cell in enumerate(self.cells):
            cell_weights = None if weights is None else weights[i]
            cell_kernels = None if kernels is None else kernels[i]
            h = cell(h, cell_weights, None, cell_kernels)["output"]  # (B, C, w/2, w/2)
        h = F.relu(h).sum(dim=(2, 3))  # (B, C)
        return self.linear(h).squeeze(1)  # (B,)


class DisBlock(nn.Module):
    """Residual block of the AutoGAN discriminator: (ReLU, conv 3x3) twice, optional average pool,
    with a 1x1 conv shortcut wherever the shape changes."""

    def __init__(self, c_in, c_out, downsample, first=False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1))
        learnable = c_in != c_out or downsample
        self.shortcut = spectral_norm(nn.Conv2d(c_in, c_out, 1)) if learnable else None

    def forward(self, x):
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.shortcut is not None:
            # The first block pools before its shortcut conv, as in SNGAN's optimized block.
            if self.first:
                s = self.shortcut(F.avg_pool2d(s, 2))
            else:
                s = self.shortcut(s)
                s = F.avg_pool2d(s, 2) if self.downsample else s
        return h + s


class AutoGANDiscriminator(nn.Module):
    """The fixed discriminator AutoGAN used and the AdversarialNAS paper retrains with: an
    optimized first block and a second block that each halve the width, two more blocks at
    that width, ReLU, sum pooling and a spectrally normalised linear layer."""

    network = "discriminator"

    def __init__(self, channels, img_size, img_channels):
        super().__init__()
        check_image_shape(img_size, img_channels)
        self.blocks = nn.Sequential(
            DisBlock(img_channels, channels, downsample=True, first=True),
            DisBlock(channels, channels, downsample=True),
            DisBlock(channels, channels, downsample=False),
            DisBlock(channels, channels, downsample=False),
        )
        self.linear = spectral_norm(nn.Linear(channels, 1))

    def forward(self, x):
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # (B, C)
        return self.linear(h).squeeze(1)


def build_discriminator(spec: Genotype | str, channels, img_size, img_channels) -> nn.Module:
    """`spec` is a discriminator genotype or "autogan" for the fixed discriminator."""
    if spec == "autogan":
        return AutoGANDiscriminator(channels, img_size, img_channels)
    if isinstance(spec, Genotype):
        return Discriminator(channels, img_size, img_channels, spec)
    raise ConfigError(f"retrain.discriminator: expected 'searched' or 'autogan', got {spec!r}")


def init_weights(module: nn.Module, rng: torch.Generator | None = None) -> None:
    """Xavier-uniform weights and zero biases for every conv and linear layer, the published
    code's choice; spectrally normalised layers get it on their unnormalised weight."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            weight = (
                m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            )
            with torch.no_grad():
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
                a = (6.0 / (fan_in + fan_out)) ** 0.5
                weight.copy_(torch.rand(weight.shape, generator=rng) * 2 * a - a)
                if m.bias is not None:
                    m.bias.zero_()


def weight_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Network weights: every parameter except the architecture weights alpha or beta."""
    arch = {id(p) for p in arch_parameters(net)}
    return [p for p in net.parameters() if id(p) not in arch]


def arch_parameters(net: nn.Module) -> list[nn.Parameter]:
    arch = getattr(net, "alpha", None) or getattr(net, "beta", None)
    return list(arch.values()) if arch is not None else []
