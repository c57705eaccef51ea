import json

import pytest
import torch

from anas.errors import ConfigError
from anas.genotypes import (
    derive,
    find_disconnected_node,
    load_genotype,
    load_shipped,
    make_genotype,
    save_genotype,
)
from anas.networks import Generator
from anas.topology import EDGES, NUM_CELLS, OUTPUT_NODE, edge_groups

NETWORKS = ("generator", "discriminator")
VERY_NEGATIVE = -30.0


def logit_tables(network, fill, overrides=None):
    """Hand-made architecture weights: per cell and edge group a tensor (edges, ops) of `fill`,
    with `overrides[(cell, edge, op)]` set where given."""
    overrides = overrides or {}
    cells = []
    for i in range(NUM_CELLS[network]):
        tables = {}
        for group in edge_groups(network, i):
            table = torch.full((len(group.edges), len(group.ops)), fill)
            for row, edge in enumerate(group.edges):
                for col, op in enumerate(group.ops):
                    if (i, edge.name, op) in overrides:
                        table[row, col] = overrides[(i, edge.name, op)]
            tables[group.name] = table
        cells.append(tables)
    return cells


def none_strongest(network):
    """Logits where `none` beats every other operation on every edge that offers it."""
    generator = torch.Generator().manual_seed(1)
    cells = []
    for i in range(NUM_CELLS[network]):
        tables = {}
        for group in edge_groups(network, i):
            table = torch.randn(len(group.edges), len(group.ops), generator=generator)
            if "none" in group.ops:
                table[:, group.ops.index("none")] = 10.0
            tables[group.name] = table
        cells.append(tables)
    return cells


def reachable_output(network, cell):
    """Whether the cell's output node is reachable from its input through non-none edges."""
    reached = {"x"}
    for edge in EDGES[network]:  # edges are listed in topological order of their sources
        if edge.source in reached and cell[edge.name] != "none":
            reached.add(edge.target)
    return OUTPUT_NODE[network] in reached


def sample_genotype():
    cell = {
        "up0": "nearest",
        "up1": "deconv",
        "c0": "conv_3x3",
        "c1": "none",
        "c2": "dil_conv_5x5",
        "c3": "skip_connect",
        "c4": "conv_1x1",
    }
    return make_genotype("generator", 32, [cell, cell | {"up1": "bilinear"}, cell])


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# Derivation


@pytest.mark.parametrize("network", NETWORKS)
def test_derive_none_everywhere_connected(network):
    genotype = derive(network, 32, none_strongest(network))
    assert find_disconnected_node(genotype) is None
    for i, cell in enumerate(genotype.cell_dicts):
        assert reachable_output(network, cell), i


@pytest.mark.parametrize("network", NETWORKS)
def test_derive_none_everywhere_loads(network, tmp_path):
    # A derived genotype must pass the same validation as a file written by hand.
    genotype = derive(network, 32, none_strongest(network))
    save_genotype(genotype, tmp_path / "g.json")
    assert load_genotype(tmp_path / "g.json") == genotype


def test_derive_compares_softmax_not_logits():
    # node2 of the generator's cells has inputs c0 and c1, both with `none` strongest. Raw logits
    # favour c0's conv_3x3 (8 > 0.5); per-edge softmax favours c1's (0.38 > 0.12).
    strong = {(i, "c4", "conv_3x3"): 5.0 for i in range(3)}
    pair = {}
    for i in range(3):
        pair |= {(i, "c0", "none"): 10.0, (i, "c0", "conv_3x3"): 8.0}
        pair |= {(i, "c1", "none"): 1.0, (i, "c1", "conv_3x3"): 0.5}
    genotype = derive("generator", 32, logit_tables("generator", VERY_NEGATIVE, strong | pair))
    for cell in genotype.cell_dicts:
        assert cell["c0"] == "none"
        assert cell["c1"] == "conv_3x3"


def test_derive_keeps_none_with_other_input():
    # c0's conv feeds node2 and c4's conv feeds node3, so `none` is kept on c1, c2 and c3.
    strong = {(i, e, "conv_3x3"): 5.0 for i in range(3) for e in ("c0", "c4")}
    nones = {(i, e, "none"): 5.0 for i in range(3) for e in ("c1", "c2", "c3")}
    genotype = derive("generator", 32, logit_tables("generator", VERY_NEGATIVE, strong | nones))
    for cell in genotype.cell_dicts:
        assert cell["c2"] == "none"
        assert cell["c3"] == "none"
        assert cell["c1"] == "none"


def test_derive_picks_strongest_op():
    picks = {(i, "c1", "dil_conv_5x5"): 5.0 for i in range(4)}
    picks |= {(i, "down0", "max_pool"): 5.0 for i in range(4)}
    cells = derive("discriminator", 32, logit_tables("discriminator", 0.0, picks)).cell_dicts
    for cell in cells:
        assert cell["c1"] == "dil_conv_5x5"
        assert cell["down0"] == "max_pool"


# JSON files


def test_round_trip(tmp_path):
    genotype = sample_genotype()
    path = tmp_path / "nested" / "generator.json"
    save_genotype(genotype, path)
    loaded = load_genotype(path)
    assert loaded == genotype
    assert loaded.hash == genotype.hash


def test_hash_format_and_sensitivity():
    genotype = sample_genotype()
    other = make_genotype("generator", 32, [genotype.cell_dicts[0] | {"c4": "conv_5x5"}] * 3)
    assert len(genotype.hash) == 12
    assert all(c in "0123456789abcdef" for c in genotype.hash)
    assert other.hash != genotype.hash


def test_save_leaves_no_temporary(tmp_path):
    save_genotype(sample_genotype(), tmp_path / "g.json")
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


def corrupt(data, case):
    """Return the genotype dict `data` broken in one way, and the field the error must name."""
    cells = data["cells"]
    if case == "unknown_op":
        cells[1]["c2"] = "conv_7x7"
        return data, "cells[1].c2"
    if case == "missing_edge":
        del cells[2]["c3"]
        return data, "cells[2].c3"
    if case == "extra_edge":
        cells[0]["c9"] = "conv_3x3"
        return data, "cells[0].c9"
    if case == "cell_count":
        data["cells"] = cells[:2]
        return data, "cells"
    if case == "network":
        data["network"] = "critic"
        return data, "network"
    if case == "schema_version":
        data["schema_version"] = 2
        return data, "schema_version"
    if case == "img_size":
        data["img_size"] = 20
        return data, "img_size"
    if case == "all_none":
        cells[1]["c0"] = cells[1]["c1"] = "none"  # node2 of cell 1 loses both inputs
        return data, "cells[1]"
    if case == "stem_op":
        # The discriminator's first cell reads the image: skip_connect cannot map its channels.
        return discriminator_dict(), "cells[0].c0"
    raise AssertionError(case)


def discriminator_dict():
    cell = {
        "c0": "skip_connect",
        "c1": "conv_3x3",
        "c2": "conv_3x3",
        "c3": "none",
        "c4": "none",
        "down0": "avg_pool",
        "down1": "conv_3x3",
    }
    return {"schema_version": 1, "network": "discriminator", "img_size": 32, "cells": [cell] * 4}


CASES = (
    "unknown_op",
    "missing_edge",
    "extra_edge",
    "cell_count",
    "network",
    "schema_version",
    "img_size",
    "all_none",
    "stem_op",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_file_rejected(case, tmp_path):
    data, field = corrupt(sample_genotype().to_dict(), case)
    path = write_json(tmp_path / f"{case}.json", data)
    with pytest.raises(ConfigError) as error:
        load_genotype(path)
    assert str(path) in str(error.value)
    assert field in str(error.value)


def test_invalid_json_rejected(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1, "network": ', encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_genotype(path)
    assert str(path) in str(error.value)
    assert "JSON" in str(error.value)


def test_missing_file_rejected(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match="absent.json"):
        load_genotype(path)


def test_unknown_shipped_rejected():
    with pytest.raises(ConfigError, match=r"retrain\.baselines"):
        load_shipped("no-such-genotype")


def test_shipped_cifar10_generator():
    genotype = load_shipped("adversarialnas-cifar10")
    assert genotype.network == "generator"
    G = Generator(12, 8, 32, 3, genotype)
    images = G(torch.randn(2, 12))
    assert images.shape == (2, 3, 32, 32)
    assert bool(torch.isfinite(images).all())
