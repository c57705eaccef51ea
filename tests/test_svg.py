import base64
import io
import re
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch
from PIL import Image

from anas import svg
from anas.errors import ConfigError
from anas.genotypes import load_shipped
from anas.topology import EDGES, NUM_CELLS, candidates

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def search(mixed_search):
    return mixed_search


def history_of(search, steps) -> list[dict]:
    entries = []
    gen = torch.Generator().manual_seed(2)
    for step in steps:
        with torch.no_grad():
            for p in [*search.G.alpha.values(), *search.D.beta.values()]:
                p.add_(torch.randn(p.shape, generator=gen))
        entries.append({"step": step, "weights": search.edge_weights()})
    return entries


def texts(root) -> list[str]:
    return [element.text for element in root.iter(f"{SVG}text")]


# Cell diagrams


def test_generator_cells_label_edges():
    genotype = load_shipped("adversarialnas-cifar10")
    root = ET.fromstring(svg.cells_svg(genotype))
    assert root.tag == f"{SVG}svg"
    used = Counter(op for cell in genotype.cell_dicts for op in cell.values())
    drawn = Counter(t for t in texts(root) if t in used)
    assert drawn == used
    assert genotype.hash in texts(root)[0]
    assert len(root.findall(f".//{SVG}ellipse")) == 3 * 5  # x and node0..node3 per cell


def test_generator_cells_skips():
    root = ET.fromstring(svg.cells_svg(load_shipped("adversarialnas-cifar10")))
    ids = sorted(p.get("id") for p in root.iter(f"{SVG}path") if p.get("id"))
    assert ids == ["skip_0_1", "skip_0_2", "skip_1_2"]


def test_none_edges_dashed_grey():
    genotype = load_shipped("adversarialnas-cifar10")
    root = ET.fromstring(svg.cells_svg(genotype))
    edges = [
        p
        for p in root.iter(f"{SVG}path")
        if p.get("marker-end") and not (p.get("id") or "").startswith("skip")
    ]
    grey = [p for p in edges if p.get("stroke") == svg.NONE_COLOUR]
    nones = sum(op == "none" for cell in genotype.cell_dicts for op in cell.values())
    assert len(grey) == nones == 1
    assert grey[0].get("stroke-dasharray")


def test_discriminator_cells(search):
    _, genotype = search.genotypes()
    root = ET.fromstring(svg.cells_svg(genotype))
    used = Counter(op for cell in genotype.cell_dicts for op in cell.values())
    assert Counter(t for t in texts(root) if t in used) == used
    assert not [p for p in root.iter(f"{SVG}path") if p.get("id")]
    assert float(root.get("width")) > float(root.get("height")) > 100


def test_arrows_end_at_outlines():
    """Each edge stops at the border of its target node, so the arrowhead is not hidden."""
    genotype = load_shipped("adversarialnas-cifar10")
    document = svg.cells_svg(genotype)
    root = ET.fromstring(document)
    centres = [
        (float(e.get("cx")), float(e.get("cy")), float(e.get("rx")), float(e.get("ry")))
        for e in root.iter(f"{SVG}ellipse")
    ]
    arrows = [p for p in root.iter(f"{SVG}path") if p.get("marker-end")]
    assert len(arrows) == 3 * len(EDGES["generator"]) + 2 + 3  # edges, links, skips
    for path in arrows:
        numbers = [float(v) for v in re.findall(r"-?\d+\.?\d*", path.get("d"))]
        start, end = numbers[0:2], numbers[-2:]
        # Where an arrow meets a node, it ends within a few pixels outside its outline.
        for x, y in (start, end):
            distances = [((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 for cx, cy, rx, ry in centres]
            nearest = min(distances)
            assert nearest >= 1.0 or nearest == pytest.approx(1.0, abs=0.05)
        assert (
            any(
                ((end[0] - cx) / rx) ** 2 + ((end[1] - cy) / ry) ** 2 < 1.4
                for cx, cy, rx, ry in centres
            )
            or path.get("stroke") == svg.LINK_COLOUR
        )


def test_write_cells_svg_creates_folder(tmp_path):
    path = svg.write_cells_svg(load_shipped("adversarialnas-cifar10"), tmp_path / "a" / "g.svg")
    assert path.read_text(encoding="utf-8").startswith("<svg")


# Architecture weights


def embedded_images(root) -> list[Image.Image]:
    images = []
    for element in root.iter(f"{SVG}image"):
        data = element.get("href").removeprefix("data:image/png;base64,")
        images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return images


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_edge_weights_one_heatmap_per_cell(search, network):
    history = history_of(search, (10, 20, 30))
    root = ET.fromstring(svg.edge_weights_svg(history, network))
    images = embedded_images(root)
    assert len(images) == NUM_CELLS[network]
    for i, image in enumerate(images):
        rows = sum(len(candidates(network, i, e)) for e in EDGES[network])
        element = list(root.iter(f"{SVG}image"))[i]
        assert float(element.get("height")) == pytest.approx(12 * rows)
        assert image.height == 12 * rows
    labels = texts(root)
    assert ("alpha" if network == "generator" else "beta") in labels[0]
    assert {"10", "20", "30"} <= set(labels)


def test_edge_weights_colours():
    """A weight of 1 is yellow, 0 is dark violet, in the pixel of its (row, step)."""
    history = []
    for step in (1, 2):
        weights = {"generator": [], "discriminator": []}
        for network in weights:
            for i in range(NUM_CELLS[network]):
                cell = {}
                for edge in EDGES[network]:
                    n = len(candidates(network, i, edge))
                    cell[edge.name] = [1.0 if k == (step - 1) % n else 0.0 for k in range(n)]
                weights[network].append(cell)
        history.append({"step": step, "weights": weights})
    root = ET.fromstring(svg.edge_weights_svg(history, "generator"))
    image = embedded_images(root)[0]
    column = image.width // 2
    # Row 0 (edge up0, first candidate) is 1 at step 1 and 0 at step 2; row 1 the reverse.
    assert image.getpixel((0, 0)) == (0xFD, 0xE7, 0x25)
    assert image.getpixel((column, 0)) == (0x44, 0x01, 0x54)
    assert image.getpixel((0, 12)) == (0x44, 0x01, 0x54)
    assert image.getpixel((column, 12)) == (0xFD, 0xE7, 0x25)


def test_edge_weights_long_search_small(search):
    history = history_of(search, range(10, 10_010, 10))
    document = svg.edge_weights_svg(history, "discriminator")
    assert len(document) < 1_000_000
    assert len(embedded_images(ET.fromstring(document))) == NUM_CELLS["discriminator"]


def test_edge_weights_errors(search):
    history = history_of(search, (10,))
    with pytest.raises(ValueError, match="empty"):
        svg.edge_weights_svg([], "generator")
    with pytest.raises(ConfigError, match="'critic'"):
        svg.edge_weights_svg(history, "critic")
    broken = {
        "step": 20,
        "weights": {"generator": [dict(c) for c in history[0]["weights"]["generator"]]},
    }
    broken["weights"]["generator"][1]["c2"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="cell 1 edge c2 has 2 weights"):
        svg.edge_weights_svg([*history, broken], "generator")


def test_write_edge_weights_svg(tmp_path, search):
    path = svg.write_edge_weights_svg(
        history_of(search, (5,)), "generator", tmp_path / "x" / "a.svg"
    )
    assert ET.parse(path).getroot().tag == f"{SVG}svg"
