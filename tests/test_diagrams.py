import shutil
from collections import Counter

import pytest
import torch
from PIL import Image

from anas.diagrams import draw_curves, draw_edge_weights, draw_genotype
from anas.errors import ConfigError
from anas.genotypes import load_shipped
from anas.topology import EDGES, NUM_CELLS, candidates

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def graphviz_installed() -> bool:
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return False
    return shutil.which("dot") is not None


ENGINES = [
    "matplotlib",
    pytest.param(
        "graphviz",
        marks=pytest.mark.skipif(
            not graphviz_installed(),
            reason="needs the `dot` program and the graphviz Python package",
        ),
    ),
]


@pytest.fixture(scope="module")
def search(mixed_search):
    return mixed_search


@pytest.fixture(scope="module")
def history(search):
    entries = []
    gen = torch.Generator().manual_seed(2)
    for step in (10, 20, 30):
        with torch.no_grad():
            for p in [*search.G.alpha.values(), *search.D.beta.values()]:
                p.add_(torch.randn(p.shape, generator=gen))
        entries.append({"step": step, "weights": search.edge_weights()})
    return entries


def label_counts(svg: str, genotype) -> tuple[Counter, Counter]:
    """How often each operation of the genotype is drawn as an edge label, and how often the
    genotype uses it."""
    used = Counter(op for cell in genotype.cell_dicts for op in cell.values())
    drawn = Counter({op: svg.count(f">{op}</text>") for op in used})
    return drawn, used


# Cell diagrams


@pytest.mark.parametrize("engine", ENGINES)
def test_generator_diagram_files(tmp_path, engine):
    paths = draw_genotype(load_shipped("adversarialnas-cifar10"), tmp_path / "gen", engine)
    assert [p.name for p in paths] == ["gen.png", "gen.svg"]
    assert paths[0].read_bytes().startswith(PNG_SIGNATURE)
    assert "<svg" in paths[1].read_text()


@pytest.mark.parametrize("engine", ENGINES)
def test_generator_diagram_labels(tmp_path, engine):
    genotype = load_shipped("adversarialnas-cifar10")
    _, svg_path = draw_genotype(genotype, tmp_path / "gen", engine)
    drawn, used = label_counts(svg_path.read_text(), genotype)
    assert drawn == used


@pytest.mark.parametrize("engine", ENGINES)
def test_generator_diagram_skips(tmp_path, engine):
    _, svg_path = draw_genotype(load_shipped("adversarialnas-cifar10"), tmp_path / "gen", engine)
    svg = svg_path.read_text()
    for source, target in [(0, 1), (0, 2), (1, 2)]:
        assert f'id="skip_{source}_{target}"' in svg
    assert svg.count('id="skip_') == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_discriminator_diagram(tmp_path, engine, search):
    _, genotype = search.genotypes()
    png_path, svg_path = draw_genotype(genotype, tmp_path / "dis", engine)
    svg = svg_path.read_text()
    drawn, used = label_counts(svg, genotype)
    assert drawn == used
    assert 'id="skip_' not in svg
    with Image.open(png_path) as image:
        assert image.width > image.height > 100


def test_diagram_shows_none_edges(tmp_path):
    genotype = load_shipped("adversarialnas-cifar10")
    nones = sum(op == "none" for cell in genotype.cell_dicts for op in cell.values())
    _, svg_path = draw_genotype(genotype, tmp_path / "gen", "matplotlib")
    assert nones == 1
    assert svg_path.read_text().count(">none</text>") == nones


def test_diagram_creates_folder(tmp_path):
    paths = draw_genotype(load_shipped("adversarialnas-cifar10"), tmp_path / "a" / "b" / "gen")
    assert all(p.is_file() for p in paths)


def test_diagram_unknown_engine(tmp_path):
    with pytest.raises(ConfigError, match="unknown 'tikz'"):
        draw_genotype(load_shipped("adversarialnas-cifar10"), tmp_path / "gen", "tikz")


@pytest.mark.skipif(graphviz_installed(), reason="Graphviz is installed here")
def test_diagram_graphviz_missing(tmp_path):
    with pytest.raises(ConfigError, match="dot"):
        draw_genotype(load_shipped("adversarialnas-cifar10"), tmp_path / "gen", "graphviz")


# Architecture weights


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_edge_weights_png(tmp_path, history, network):
    path = draw_edge_weights(history, network, tmp_path / f"{network}.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_edge_weights_rows_grow_image(tmp_path, history):
    # The discriminator has more (edge, operation) rows per cell, so its heatmaps are taller.
    g_rows = max(
        sum(len(candidates("generator", i, e)) for e in EDGES["generator"])
        for i in range(NUM_CELLS["generator"])
    )
    d_rows = max(
        sum(len(candidates("discriminator", i, e)) for e in EDGES["discriminator"])
        for i in range(NUM_CELLS["discriminator"])
    )
    g_path = draw_edge_weights(history, "generator", tmp_path / "alpha.png")
    d_path = draw_edge_weights(history, "discriminator", tmp_path / "beta.png")
    with Image.open(g_path) as g_image, Image.open(d_path) as d_image:
        assert d_rows > g_rows
        assert d_image.height > g_image.height


def test_edge_weights_one_step(tmp_path, history):
    path = draw_edge_weights(history[:1], "generator", tmp_path / "alpha.png")
    assert path.is_file()


def test_edge_weights_empty_history(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        draw_edge_weights([], "generator", tmp_path / "alpha.png")


def test_edge_weights_unknown_network(tmp_path, history):
    with pytest.raises(ConfigError, match="'critic'"):
        draw_edge_weights(history, "critic", tmp_path / "x.png")


def test_edge_weights_wrong_length(tmp_path, history):
    broken = {
        "step": 40,
        "weights": {"generator": [dict(c) for c in history[0]["weights"]["generator"]]},
    }
    broken["weights"]["generator"][1]["c2"] = [0.5, 0.5]
    with pytest.raises(ValueError, match="cell 1 edge c2 has 2 weights"):
        draw_edge_weights([*history, broken], "generator", tmp_path / "alpha.png")


# Curves


def test_curves_png(tmp_path):
    series = {
        "d_loss": [(step, 1.0 / step) for step in range(1, 60)],
        "g_loss": [(step, 0.01 * step) for step in range(1, 60)],
    }
    path = draw_curves(series, tmp_path / "losses.png", "losses")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_curves_skip_empty_series(tmp_path):
    path = draw_curves({"fid": [(10, 80.0), (20, 60.0)], "is": []}, tmp_path / "fid.png", "FID")
    assert path.is_file()


def test_curves_nan_values(tmp_path):
    series = {"fid": [(10, 80.0), (20, float("nan")), (30, 50.0)]}
    path = draw_curves(series, tmp_path / "fid.png", "FID", ylabel="FID")
    assert path.is_file()


def test_curves_no_points(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        draw_curves({"fid": []}, tmp_path / "fid.png", "FID")
