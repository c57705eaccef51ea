"""Cell topologies of the two networks: which edges exist, what they connect, what they offer.

This file is the single description of the search space's wiring. The supernet, the derived
networks, genotype validation, derivation and the cell diagrams all read it.
"""

from dataclasses import dataclass

from anas.ops import DOWN_OPS, FAMILIES, NORMAL_OPS

NETWORKS = ("generator", "discriminator")
NUM_CELLS = {"generator": 3, "discriminator": 4}


@dataclass(frozen=True)
class Edge:
    name: str
    family: str  # "up", "normal" or "down": the registry its candidates come from
    source: str  # "x" (the cell input) or a node name
    target: str


# Up-cell: node0 = up0(x), node1 = up1(x), node2 = c0(node0) + c1(node1) (+ cross-scale skips),
# node3 = c2(node0) + c3(node1) + c4(node2). The cell outputs node3 and hands node2 to later cells.
GENERATOR_EDGES = (
    Edge("up0", "up", "x", "node0"),
    Edge("up1", "up", "x", "node1"),
    Edge("c0", "normal", "node0", "node2"),
    Edge("c1", "normal", "node1", "node2"),
    Edge("c2", "normal", "node0", "node3"),
    Edge("c3", "normal", "node1", "node3"),
    Edge("c4", "normal", "node2", "node3"),
)

# Down-cell: node0 = c0(x), node1 = c1(x) + c3(node0), node2 = c2(x) + c4(node0),
# output = down0(node1) + down1(node2).
DISCRIMINATOR_EDGES = (
    Edge("c0", "normal", "x", "node0"),
    Edge("c1", "normal", "x", "node1"),
    Edge("c2", "normal", "x", "node2"),
    Edge("c3", "normal", "node0", "node1"),
    Edge("c4", "normal", "node0", "node2"),
    Edge("down0", "down", "node1", "output"),
    Edge("down1", "down", "node2", "output"),
)

EDGES = {"generator": GENERATOR_EDGES, "discriminator": DISCRIMINATOR_EDGES}
OUTPUT_NODE = {"generator": "node3", "discriminator": "output"}


def candidates(network: str, cell: int, edge: Edge) -> list[str]:
    """Operation names an edge may take.

    The discriminator's first cell reads the image, whose channel count differs from the cell's,
    so its edges from the input offer only operations that map channels (the convolutions).
    """
    names = FAMILIES[edge.family].names()
    if network == "discriminator" and cell == 0 and edge.source == "x":
        registry = NORMAL_OPS if edge.family == "normal" else DOWN_OPS
        names = [n for n in names if registry.get(n).maps_channels]
    return names


def node_inputs(network: str) -> dict[str, list[Edge]]:
    """Edges entering each node, in topological order of the nodes."""
    nodes: dict[str, list[Edge]] = {}
    for edge in EDGES[network]:
        nodes.setdefault(edge.target, []).append(edge)
    return nodes


@dataclass(frozen=True)
class EdgeGroup:
    """Edges of one cell that share a candidate list, and so share one weight tensor.

    The tensor has shape (len(edges), len(ops)): one row of logits per edge.
    """

    name: str
    edges: tuple[Edge, ...]
    ops: tuple[str, ...]


def edge_groups(network: str, cell: int) -> list[EdgeGroup]:
    groups: dict[tuple[str, ...], list[Edge]] = {}
    for edge in EDGES[network]:
        groups.setdefault(tuple(candidates(network, cell, edge)), []).append(edge)
    result = []
    for ops, edges in groups.items():
        family = edges[0].family
        is_stem = network == "discriminator" and cell == 0 and edges[0].source == "x"
        result.append(EdgeGroup(f"{family}_stem" if is_stem else family, tuple(edges), ops))
    return result
