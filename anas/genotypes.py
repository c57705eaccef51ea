"""Genotypes: the discrete architecture as operation names, derived from alpha or beta.

A genotype file is JSON:

    {"schema_version": 1, "network": "generator", "img_size": 32,
     "cells": [{"up0": "nearest", "up1": "bilinear", "c0": "conv_3x3", ...}, ...]}

Loading checks every name, edge and shape against anas.topology and rejects anything else with
an error naming the file and the field. Nothing is unpickled.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from anas.errors import ConfigError
from anas.topology import EDGES, NETWORKS, NUM_CELLS, candidates, edge_groups, node_inputs

SCHEMA_VERSION = 1

# Files shipped in anas/shipped_genotypes/, addressable by name in `retrain.baselines`.
SHIPPED = {"adversarialnas-cifar10": "adversarialnas_cifar10_generator.json"}


@dataclass(frozen=True)
class Genotype:
    network: str  # "generator" or "discriminator"
    img_size: int  # image size the architecture was searched at; the cells work at any size
    cells: tuple[tuple[tuple[str, str], ...], ...]  # per cell: (edge name, operation name) pairs

    @property
    def cell_dicts(self) -> list[dict[str, str]]:
        return [dict(cell) for cell in self.cells]

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "network": self.network,
            "img_size": self.img_size,
            "cells": self.cell_dicts,
        }

    @property
    def hash(self) -> str:
        """12 hex characters identifying the operations alone (image size excluded)."""
        text = json.dumps([self.network, self.cell_dicts], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_genotype(network: str, img_size: int, cells: Sequence[Mapping[str, str]]) -> Genotype:
    """Build a genotype in the topology's edge order; `validate` before trusting it."""
    order = [edge.name for edge in EDGES[network]]
    return Genotype(network, img_size, tuple(tuple((e, cell[e]) for e in order) for cell in cells))


def genotype_from_dict(data: object, source: str = "genotype") -> Genotype:
    """Check a parsed JSON object field by field; `source` (a file name) prefixes every error."""

    def fail(field: str, problem: str):
        raise ConfigError(f"{source}: field {field!r}: {problem}")

    if not isinstance(data, Mapping):
        fail("<root>", f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        fail("schema_version", f"expected {SCHEMA_VERSION}, got {version!r}")
    network = data.get("network")
    if network not in NETWORKS:
        fail("network", f"expected one of {', '.join(NETWORKS)}, got {network!r}")
    img_size = data.get("img_size")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 16 or img_size % 8:
        fail("img_size", f"expected a multiple of 8 from 16 up, got {img_size!r}")
    cells = data.get("cells")
    if not isinstance(cells, list) or len(cells) != NUM_CELLS[network]:
        count = len(cells) if isinstance(cells, list) else type(cells).__name__
        fail("cells", f"a {network} has {NUM_CELLS[network]} cells, got {count}")
    for i, cell in enumerate(cells):
        if not isinstance(cell, Mapping):
            fail(f"cells[{i}]", "expected an object of edge names to operation names")
        expected = {edge.name: edge for edge in EDGES[network]}
        for name in cell:
            if name not in expected:
                fail(
                    f"cells[{i}].{name}",
                    f"unknown edge; a {network} cell has {', '.join(expected)}",
                )
        for name, edge in expected.items():
            if name not in cell:
                fail(f"cells[{i}].{name}", "missing edge")
            allowed = candidates(network, i, edge)
            if cell[name] not in allowed:
                fail(
                    f"cells[{i}].{name}",
                    f"invalid operation {cell[name]!r}; expected one of {', '.join(allowed)}",
                )
    genotype = make_genotype(network, img_size, cells)
    problem = find_disconnected_node(genotype)
    if problem:
        fail(f"cells[{problem[0]}]", f"node {problem[1]} has no input: every input edge is none")
    return genotype


def find_disconnected_node(genotype: Genotype) -> tuple[int, str] | None:
    """Return the first (cell, node) all of whose input edges are `none`, if any."""
    for i, cell in enumerate(genotype.cell_dicts):
        for node, edges in node_inputs(genotype.network).items():
            if all(cell[e.name] == "none" for e in edges):
                return i, node
    return None


def load_genotype(path: str | os.PathLike) -> Genotype:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read genotype file: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    return genotype_from_dict(data, str(path))


def load_shipped(name: str, key: str = "retrain.baselines") -> Genotype:
    """Load a genotype file shipped with the package, by its short name."""
    if name not in SHIPPED:
        raise ConfigError(
            f"{key}: unknown shipped genotype {name!r}; expected one of {', '.join(SHIPPED)}"
        )
    resource = resources.files("anas") / "shipped_genotypes" / SHIPPED[name]
    with resources.as_file(resource) as path:
        return load_genotype(path)


def save_genotype(
    genotype: Genotype, path: str | os.PathLike, extra: Mapping | None = None
) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = genotype.to_dict() | dict(extra or {})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def derive(network: str, img_size: int, weights: Sequence[Mapping[str, torch.Tensor]]) -> Genotype:
    """Choose one operation per edge from architecture weights.

    `weights[cell][group]` is a tensor (edges, ops) of logits for the cell's edge group (see
    anas.topology.edge_groups). Per edge, the logits go through a softmax over that edge's own
    candidates and the strongest operation wins. An edge keeps `none` only where its node has
    another non-none input; a node left without any takes, on the one edge where it is strongest,
    its strongest non-none operation. Comparing softmax values (not raw logits) across edges keeps
    edges with different numbers of candidates comparable.
    """
    cells = []
    for i in range(NUM_CELLS[network]):
        probs: dict[str, dict[str, float]] = {}
        for group in edge_groups(network, i):
            table = torch.softmax(weights[i][group.name].detach().float().cpu(), dim=-1)
            for row, edge in enumerate(group.edges):
                probs[edge.name] = dict(zip(group.ops, table[row].tolist(), strict=True))
        chosen = {edge: max(p, key=p.get) for edge, p in probs.items()}
        for edges in node_inputs(network).values():
            if all(chosen[e.name] == "none" for e in edges):
                best = max(
                    (
                        (e.name, op, p)
                        for e in edges
                        for op, p in probs[e.name].items()
                        if op != "none"
                    ),
                    key=lambda item: item[2],
                )
                chosen[best[0]] = best[1]
        cells.append(chosen)
    return make_genotype(network, img_size, cells)
