"""Pictures of a search: derived cells, alpha and beta over time, loss and FID curves.

Everything draws with matplotlib's Agg canvas on a `Figure` of its own (never pyplot), so no
window opens and no global plotting state changes. Cell diagrams use Graphviz when both its `dot`
program and the `graphviz` Python package are installed, and a matplotlib drawing of the same
graph otherwise. The layout and colours come from `anas.svg`, which writes the SVG pictures that
search trials log without matplotlib.
"""

import functools
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse, FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator

from anas.errors import ConfigError
from anas.genotypes import Genotype
from anas.svg import (
    CELL_GAP,
    CELL_WIDTH,
    FAMILY_COLOURS,
    LINK_COLOUR,
    NODE_SIZE,
    NONE_COLOUR,
    ROW_HEIGHT,
    SKIP_COLOUR,
    arc_midpoint,
    bend,
    cell_frame,
    cell_title,
    node_depths,
    node_fill,
    node_positions,
    skip_bend,
    skips,
    thin_ticks,
    title,
    weight_tables,
)
from anas.topology import EDGES, OUTPUT_NODE

log = logging.getLogger(__name__)

ENGINES = ("graphviz", "matplotlib")

INCHES_PER_UNIT = 0.62  # size of one layout unit in the matplotlib drawing


# Cell diagrams


def draw_genotype(
    genotype: Genotype, path_stem: str | Path, engine: str | None = None
) -> list[Path]:
    """Draw every cell of a derived network and write `<path_stem>.png` and `<path_stem>.svg`.

    Edges carry their operation names; `none` edges are dashed and grey. A generator also shows
    its cross-scale skips (node2 of each cell into node2 of every later cell). `engine` is
    "graphviz", "matplotlib" or None, which picks Graphviz when it is installed.
    """
    if engine is None:
        engine = "graphviz" if _graphviz_available() else "matplotlib"
    if engine not in ENGINES:
        raise ConfigError(f"diagram engine: unknown {engine!r}; expected one of {ENGINES}")
    if engine == "graphviz" and not _graphviz_available():
        raise ConfigError(
            "diagram engine: graphviz needs the `dot` program and the `graphviz` Python package; "
            "install both or use engine='matplotlib'"
        )
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")]
    if engine == "graphviz":
        source = _graphviz_source(genotype)
        for path in paths:
            path.write_bytes(source.pipe(format=path.suffix[1:]))
    else:
        figure = _matplotlib_cells(genotype)
        # Keep SVG text as text, not glyph outlines, so names stay searchable and selectable.
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            for path in paths:
                figure.savefig(path, dpi=150, bbox_inches="tight")
    return paths


@functools.cache  # checked once per process, so the fallback is logged once
def _graphviz_available() -> bool:
    if shutil.which("dot") is None:
        return False
    try:
        import graphviz  # noqa: F401  (optional: only its presence is checked here)
    except ImportError:
        log.info("`dot` is installed but the graphviz Python package is not; using matplotlib")
        return False
    return True


def _graphviz_source(genotype: Genotype):
    import graphviz

    network = genotype.network
    graph = graphviz.Digraph(
        network,
        graph_attr={
            "rankdir": "LR",
            "label": title(genotype),
            "labelloc": "t",
            "fontname": "Helvetica",
            "fontsize": "16",
        },
        node_attr={"shape": "ellipse", "fontname": "Helvetica", "fontsize": "11"},
        edge_attr={"fontname": "Helvetica", "fontsize": "10"},
    )
    output = OUTPUT_NODE[network]
    for i, cell in enumerate(genotype.cell_dicts):
        with graph.subgraph(name=f"cluster_{i}") as sub:
            sub.attr(label=cell_title(genotype, i), style="rounded", color="gray60")
            for node in node_depths(network):
                sub.node(f"c{i}_{node}", node, style="filled", fillcolor=node_fill(node, output))
            for edge in EDGES[network]:
                op = cell[edge.name]
                colour = NONE_COLOUR if op == "none" else FAMILY_COLOURS[edge.family]
                sub.edge(
                    f"c{i}_{edge.source}",
                    f"c{i}_{edge.target}",
                    label=op,
                    color=colour,
                    fontcolor=colour,
                    style="dashed" if op == "none" else "solid",
                )
        if i:
            graph.edge(f"c{i - 1}_{output}", f"c{i}_x", color=LINK_COLOUR, penwidth="2")
    for source, target in skips(genotype):
        graph.edge(
            f"c{source}_node2",
            f"c{target}_node2",
            color=SKIP_COLOUR,
            style="dashed",
            constraint="false",
            id=f"skip_{source}_{target}",
            label="skip",
            fontcolor=SKIP_COLOUR,
        )
    return graph


def _matplotlib_cells(genotype: Genotype) -> Figure:
    network = genotype.network
    cells = genotype.cell_dicts
    depths = node_depths(network)
    deepest = max(depths.values())
    output = OUTPUT_NODE[network]
    top, bottom, width = cell_frame(network)
    figure = Figure(figsize=((width + 1) * INCHES_PER_UNIT, (top - bottom + 2.2) * INCHES_PER_UNIT))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.01, 0.12, 0.98, 0.8))
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(bottom - 0.1, top + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    figure.suptitle(title(genotype), fontsize=12)

    nodes: list[dict[str, Ellipse]] = []
    for i, cell in enumerate(cells):
        # The cell's frame, title and nodes.
        left = i * (CELL_WIDTH + CELL_GAP)
        frame = FancyBboxPatch(
            (left, bottom),
            CELL_WIDTH,
            top - bottom,
            boxstyle="round,pad=0,rounding_size=0.3",
            facecolor="#f7f7f7",
            edgecolor="#bbbbbb",
        )
        ax.add_patch(frame)
        ax.text(left + CELL_WIDTH / 2, top + 0.2, cell_title(genotype, i), ha="center", size=9)
        positions = node_positions(network, left)
        patches = {}
        for node, (x, y) in positions.items():
            fill = node_fill(node, output)
            patch = Ellipse((x, y), *NODE_SIZE, facecolor=fill, edgecolor="black", zorder=3)
            ax.add_patch(patch)
            ax.text(x, y, node, ha="center", va="center", size=8, zorder=4)
            patches[node] = patch
        nodes.append(patches)

        # One arrow per edge, labelled with its operation.
        for edge in EDGES[network]:
            op = cell[edge.name]
            a, b = positions[edge.source], positions[edge.target]
            rad = bend(a, b, depths[edge.target] - depths[edge.source], left + CELL_WIDTH / 2)
            colour = NONE_COLOUR if op == "none" else FAMILY_COLOURS[edge.family]
            arrow = FancyArrowPatch(
                a,
                b,
                patchA=patches[edge.source],
                patchB=patches[edge.target],
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=10,
                color=colour,
                linestyle="--" if op == "none" else "-",
                linewidth=1.0 if op == "none" else 1.3,
                zorder=2,
            )
            ax.add_patch(arrow)
            x, y = arc_midpoint(a, b, rad)
            box = {"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"}
            ax.text(x, y, op, ha="center", va="center", size=7, color=colour, bbox=box, zorder=5)

        # The previous cell's output is this cell's input.
        if i:
            ax.add_patch(
                FancyArrowPatch(
                    (left - CELL_GAP + 0.05, -deepest * ROW_HEIGHT / 2),
                    (left - 0.05, -deepest * ROW_HEIGHT / 2),
                    arrowstyle="-|>",
                    mutation_scale=14,
                    color=LINK_COLOUR,
                    linewidth=2,
                )
            )
            ax.text(
                left - CELL_GAP / 2,
                -deepest * ROW_HEIGHT / 2 + 0.3,
                f"{output} -> x",
                ha="center",
                size=7,
                color=LINK_COLOUR,
            )

    for source, target in skips(genotype):
        ax.add_patch(
            FancyArrowPatch(
                nodes[source]["node2"].center,
                nodes[target]["node2"].center,
                patchA=nodes[source]["node2"],
                patchB=nodes[target]["node2"],
                connectionstyle=f"arc3,rad={skip_bend(target - source)}",
                arrowstyle="-|>",
                mutation_scale=10,
                color=SKIP_COLOUR,
                linestyle=(0, (4, 2)),
                linewidth=1.1,
                alpha=0.8,
                zorder=1,
                gid=f"skip_{source}_{target}",  # the element id in SVG output
            )
        )

    _legend(figure, genotype)
    return figure


def _legend(figure: Figure, genotype: Genotype) -> None:
    families = sorted({edge.family for edge in EDGES[genotype.network]})
    handles = [
        Line2D([], [], color=FAMILY_COLOURS[f], lw=1.3, label=f"{f} operation") for f in families
    ]
    handles.append(Line2D([], [], color=NONE_COLOUR, lw=1, ls="--", label="none (no edge)"))
    if skips(genotype):
        label = "cross-scale skip (1x1 conv)"
        handles.append(Line2D([], [], color=SKIP_COLOUR, lw=1.1, ls=(0, (4, 2)), label=label))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


# Architecture weights over a search


def draw_edge_weights(history: Sequence[Mapping], network: str, path: str | Path) -> Path:
    """Draw how alpha (generator) or beta (discriminator) moved during a search, as a PNG.

    `history` is a list of {"step": int, "weights": Search.edge_weights()}. One heatmap per cell:
    rows are (edge, candidate operation), columns are the recorded steps, colour is the softmax
    weight of the operation on its edge.
    """
    steps, panels = weight_tables(history, network)
    rows = max(len(labels) for labels, _, _ in panels)

    panel_width = 2.6 + min(4.0, 0.25 * len(steps))
    size = (panel_width * len(panels) + 1.2, 1.6 + 0.14 * rows)
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for i, (ax, (labels, matrix, bounds)) in enumerate(zip(axes, panels, strict=True)):
        image = ax.imshow(
            matrix, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest"
        )
        ax.set_title(f"cell {i}", fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ticks = thin_ticks(len(steps), 8)
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_xlabel("step", fontsize=8)
        for bound in bounds:
            ax.axhline(bound - 0.5, color="white", linewidth=1.2)
    symbol = "alpha" if network == "generator" else "beta"
    figure.suptitle(f"{symbol} ({network}): softmax weight of each operation per edge")
    figure.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01, label="softmax weight")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


# Curves


def draw_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str,
    ylabel: str = "",
) -> Path:
    """Draw one line per named series of (step, value) points and write a PNG.

    Empty series are left out; non-finite values leave gaps. Raises ValueError when no series
    has a point.
    """
    drawn = {name: points for name, points in series.items() if points}
    if not drawn:
        raise ValueError(f"{title}: no points to draw")
    figure = Figure(figsize=(6.0, 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, points in drawn.items():
        steps, values = zip(*sorted(points), strict=True)
        marker = "o" if len(points) <= 25 else None
        ax.plot(steps, values, label=name, linewidth=1.3, marker=marker, markersize=3)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = {step for points in drawn.values() for step, _ in points}
    if len(steps) == 1:
        # A single step would get an axis 0.1 wide with fractional ticks.
        only = steps.pop()
        ax.set_xlim(only - 1, only + 1)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(drawn) > 1:
        # Below the axes, so long run names do not squeeze the plot.
        columns = 1 if max(map(len, drawn)) > 30 else min(3, len(drawn))
        figure.legend(loc="outside lower center", ncols=columns, fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
