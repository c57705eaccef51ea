"""Cell diagrams and architecture-weight heatmaps written directly as SVG text.

Search trials draw a picture at every evaluation. Writing the SVG elements here takes about a
millisecond, where laying out and saving the same figure with matplotlib takes half a second
per picture on a 2-core CPU, as long as a search step at the smoke sizes. Browsers and the MLflow
UI show SVG artifacts as images; text stays text, so operation names can be searched and
selected. `anas.diagrams` draws the PNG versions with matplotlib and reuses the layout below.
"""

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from PIL import Image

from anas.errors import ConfigError
from anas.genotypes import Genotype
from anas.topology import EDGES, NETWORKS, NUM_CELLS, OUTPUT_NODE, candidates, node_inputs

# Edge colours by the registry an edge's operations come from.
FAMILY_COLOURS = {"up": "#1f5fbf", "normal": "#222222", "down": "#b8332b"}
NONE_COLOUR = "#9a9a9a"
SKIP_COLOUR = "#2e8b57"
LINK_COLOUR = "#666666"

# Layout of a cell diagram, in units of the drawing.
CELL_WIDTH = 4.6
CELL_GAP = 1.6
ROW_HEIGHT = 1.5  # vertical distance between node depths
NODE_OFFSET = 1.3  # horizontal distance of side-by-side nodes from the cell's centre line
NODE_SIZE = (1.15, 0.5)  # ellipse width and height
CURVE = 0.5  # bend of an edge that skips a depth, as a fraction of its chord (matplotlib's rad)

PIXELS_PER_UNIT = 56
FONT = "Helvetica, Arial, sans-serif"

# matplotlib's viridis colour map at 17 evenly spaced points; values between are interpolated.
VIRIDIS = (
    "#440154", "#48186a", "#472d7b", "#424086", "#3b528b", "#33638d", "#2c728e", "#26828e",
    "#21918c", "#1fa088", "#28ae80", "#3fbc73", "#5ec962", "#84d44b", "#addc30", "#d8e219",
    "#fde725",
)  # fmt: skip


# Layout shared with the matplotlib drawing


def title(genotype: Genotype) -> str:
    size = genotype.img_size
    return f"{genotype.network} {genotype.hash} (searched at {size}x{size})"


def cell_title(genotype: Genotype, i: int) -> str:
    if genotype.network == "generator":
        width = genotype.img_size // 8 * 2**i
        return f"cell {i}: {width} -> {2 * width} px"
    width = genotype.img_size // 2**i
    return f"cell {i}: {width} -> {width // 2} px"


def node_depths(network: str) -> dict[str, int]:
    """Longest path from the cell input `x` to each node; node_inputs lists nodes in topological
    order, so one pass suffices."""
    depths = {"x": 0}
    for node, edges in node_inputs(network).items():
        depths[node] = 1 + max(depths[e.source] for e in edges)
    return depths


def node_fill(node: str, output: str) -> str:
    """Blue for the cell input, orange for the cell output, white for inner nodes."""
    if node == "x":
        return "#dde8f7"
    if node == output:
        return "#fde9c8"
    return "white"


def skips(genotype: Genotype) -> list[tuple[int, int]]:
    """(source cell, target cell) of each cross-scale skip between node2 outputs."""
    if genotype.network != "generator":
        return []
    n = len(genotype.cells)
    return [(j, i) for i in range(n) for j in range(i)]


def node_positions(network: str, left: float) -> dict[str, tuple[float, float]]:
    """Nodes of one cell: depth runs downwards, nodes of equal depth sit side by side."""
    by_depth: dict[int, list[str]] = {}
    for node, depth in node_depths(network).items():
        by_depth.setdefault(depth, []).append(node)
    centre = left + CELL_WIDTH / 2
    positions = {}
    for depth, nodes in by_depth.items():
        for k, node in enumerate(nodes):
            offset = (k - (len(nodes) - 1) / 2) * 2 * NODE_OFFSET
            positions[node] = (centre + offset, -depth * ROW_HEIGHT)
    return positions


def arc_control(a, b, rad: float) -> tuple[float, float]:
    """Control point of the quadratic Bezier from a to b that sits `rad` times the chord length
    off the chord's middle (matplotlib's arc3 connection)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return (a[0] + b[0]) / 2 + rad * dy, (a[1] + b[1]) / 2 - rad * dx


def arc_midpoint(a, b, rad: float) -> tuple[float, float]:
    """Point of that curve halfway along its parameter, where the edge label goes."""
    c = arc_control(a, b, rad)
    return (a[0] + 2 * c[0] + b[0]) / 4, (a[1] + 2 * c[1] + b[1]) / 4


def bend(a, b, depth_span: int, centre: float) -> float:
    """Straight for neighbouring depths, else a curve that bows away from the cell's centre so
    it clears the nodes in between."""
    if depth_span <= 1:
        return 0.0
    away = -1.0 if (a[0] + b[0]) / 2 <= centre else 1.0
    x, _ = arc_midpoint(a, b, CURVE)
    return CURVE if (x - (a[0] + b[0]) / 2) * away > 0 else -CURVE


def skip_bend(cells_apart: int) -> float:
    """Bend of a skip arc between node2s: it dips 0.9 units below node2 to pass between the
    edge labels and node3, and further when it passes under the node3s of cells in between."""
    dip = 0.9 if cells_apart == 1 else ROW_HEIGHT + 0.6
    chord = cells_apart * (CELL_WIDTH + CELL_GAP)
    return 2 * dip / chord


def cell_frame(network: str) -> tuple[float, float, float]:
    """Return the top, bottom and total width of a network's row of cells."""
    deepest = max(node_depths(network).values())
    width = NUM_CELLS[network] * CELL_WIDTH + (NUM_CELLS[network] - 1) * CELL_GAP
    return 0.9, -deepest * ROW_HEIGHT - 0.9, width


# Cell diagrams


def write_cells_svg(genotype: Genotype, path: str | Path) -> Path:
    """Write the cell diagram of a derived network to `path` (an .svg file) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cells_svg(genotype), encoding="utf-8")
    return path


def cells_svg(genotype: Genotype) -> str:
    """Return every cell of a derived network as one SVG document.

    Edges carry their operation names; `none` edges are dashed and grey. A generator also shows
    its cross-scale skips (node2 of each cell into node2 of every later cell), as paths with the
    ids skip_<source>_<target>.
    """
    network = genotype.network
    depths = node_depths(network)
    output = OUTPUT_NODE[network]
    top, bottom, width = cell_frame(network)
    header, footer = 40, 40
    canvas = _Canvas(left=-0.5, top=top + 0.5, header=header)
    canvas.width = (width + 1) * PIXELS_PER_UNIT
    canvas.height = header + (top + 0.6 - bottom) * PIXELS_PER_UNIT + footer

    body: list[str] = []
    labels: list[str] = []  # drawn last, over every line
    nodes: list[dict[str, tuple[float, float]]] = []
    for i, cell in enumerate(genotype.cell_dicts):
        left = i * (CELL_WIDTH + CELL_GAP)
        x, y = canvas.point(left, top)
        body.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{CELL_WIDTH * PIXELS_PER_UNIT:.1f}" '
            f'height="{(top - bottom) * PIXELS_PER_UNIT:.1f}" rx="17" '
            'fill="#f7f7f7" stroke="#bbbbbb"/>'
        )
        labels.append(canvas.text(left + CELL_WIDTH / 2, top + 0.2, cell_title(genotype, i), 12))
        positions = node_positions(network, left)
        nodes.append(positions)
        for edge in EDGES[network]:
            op = cell[edge.name]
            a, b = positions[edge.source], positions[edge.target]
            rad = bend(a, b, depths[edge.target] - depths[edge.source], left + CELL_WIDTH / 2)
            colour = NONE_COLOUR if op == "none" else FAMILY_COLOURS[edge.family]
            dash = "5,3" if op == "none" else None
            body.append(canvas.arc(a, b, rad, colour, 1.2 if op == "none" else 1.6, dash))
            mx, my = arc_midpoint(a, b, rad)
            labels.append(canvas.text(mx, my, op, 10, colour, boxed=True))
        for node, (x, y) in positions.items():
            body.append(canvas.ellipse(x, y, node_fill(node, output)))
            labels.append(canvas.text(x, y, node, 11))
        if i:
            # The previous cell's output is this cell's input.
            level = -max(depths.values()) * ROW_HEIGHT / 2
            start, end = (left - CELL_GAP + 0.05, level), (left - 0.05, level)
            body.append(canvas.arc(start, end, 0.0, LINK_COLOUR, 2.5, clip=False))
            labels.append(
                canvas.text(left - CELL_GAP / 2, level + 0.3, f"{output} -> x", 10, LINK_COLOUR)
            )
    for source, target in skips(genotype):
        a, b = nodes[source]["node2"], nodes[target]["node2"]
        body.append(
            canvas.arc(
                a,
                b,
                skip_bend(target - source),
                SKIP_COLOUR,
                1.4,
                "6,3",
                element_id=f"skip_{source}_{target}",
                opacity=0.8,
            )
        )

    legend = [(FAMILY_COLOURS[f], None, f"{f} operation") for f in _families(network)]
    legend.append((NONE_COLOUR, "5,3", "none (no edge)"))
    if skips(genotype):
        legend.append((SKIP_COLOUR, "6,3", "cross-scale skip (1x1 conv)"))
    footer_items = _legend(legend, canvas.width, canvas.height - footer / 2)
    heading = (
        f'<text x="{canvas.width / 2:.1f}" y="26" text-anchor="middle" font-size="16">'
        f"{escape(title(genotype))}</text>"
    )
    return canvas.document([*canvas.markers(), heading, *body, *labels, *footer_items])


def _families(network: str) -> list[str]:
    return sorted({edge.family for edge in EDGES[network]})


def _legend(items, total_width: float, y: float) -> list[str]:
    """Return one legend row of (colour, dash, label) samples centred at height y."""
    widths = [36 + _text_width(label, 12) + 24 for _, _, label in items]
    x = (total_width - sum(widths)) / 2
    parts = []
    for (colour, dash, label), width in zip(items, widths, strict=True):
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 28:.1f}" y2="{y:.1f}" '
            f'stroke="{colour}" stroke-width="1.6"{dashes}/>'
        )
        parts.append(
            f'<text x="{x + 36:.1f}" y="{y:.1f}" dominant-baseline="central" font-size="12">'
            f"{escape(label)}</text>"
        )
        x += width
    return parts


def _text_width(text: str, size: float) -> float:
    """Return an estimate of the width of a sans-serif line of text, for layout only."""
    return 0.56 * size * len(text)


class _Canvas:
    """Maps drawing units (y upwards) to SVG pixels (y downwards) and writes elements."""

    def __init__(self, left: float, top: float, header: float):
        self.left, self.top, self.header = left, top, header
        self.width = self.height = 0.0
        self.colours: set[str] = set()

    def point(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.left) * PIXELS_PER_UNIT, self.header + (self.top - y) * PIXELS_PER_UNIT

    def ellipse(self, x: float, y: float, fill: str) -> str:
        cx, cy = self.point(x, y)
        rx, ry = (s / 2 * PIXELS_PER_UNIT for s in NODE_SIZE)
        return (
            f'<ellipse cx="{cx:.1f}" cy="{cy:.1f}" rx="{rx:.1f}" ry="{ry:.1f}" '
            f'fill="{fill}" stroke="black"/>'
        )

    def text(self, x, y, content: str, size: float, colour="black", boxed=False) -> str:
        """Centred text; `boxed` puts it on a white box that hides the lines under it."""
        px, py = self.point(x, y)
        box = ""
        if boxed:
            w, h = _text_width(content, size) + 6, size + 4
            box = (
                f'<rect x="{px - w / 2:.1f}" y="{py - h / 2:.1f}" width="{w:.1f}" '
                f'height="{h:.1f}" rx="3" fill="white"/>'
            )
        return box + (
            f'<text x="{px:.1f}" y="{py:.1f}" text-anchor="middle" dominant-baseline="central" '
            f'font-size="{size}" fill="{colour}">{escape(content)}</text>'
        )

    def arc(
        self,
        a,
        b,
        rad: float,
        colour: str,
        width: float,
        dash: str | None = None,
        clip: bool = True,
        element_id: str | None = None,
        opacity: float = 1.0,
    ) -> str:
        """Return an arrow along the arc3 curve from a to b, cut where it leaves node a and
        enters node b, so the arrowhead stays visible."""
        c = arc_control(a, b, rad)
        t0, t1 = (_exit(a, c, b, a, True), _exit(a, c, b, b, False)) if clip else (0.0, 1.0)
        p0, q, p1 = _sub_curve(a, c, b, t0, t1)
        (x0, y0), (qx, qy), (x1, y1) = (self.point(*p) for p in (p0, q, p1))
        self.colours.add(colour)
        attributes = [
            f'd="M{x0:.1f},{y0:.1f} Q{qx:.1f},{qy:.1f} {x1:.1f},{y1:.1f}"',
            f'fill="none" stroke="{colour}" stroke-width="{width}"',
            f'marker-end="url(#arrow-{colour[1:]})"',
        ]
        if dash:
            attributes.append(f'stroke-dasharray="{dash}"')
        if opacity < 1:
            attributes.append(f'opacity="{opacity}"')
        if element_id:
            attributes.insert(0, f"id={quoteattr(element_id)}")
        return f"<path {' '.join(attributes)}/>"

    def markers(self) -> list[str]:
        """Return one arrowhead marker per colour used, because SVG 1.1 markers cannot take the
        colour of their line."""
        heads = [
            f'<marker id="arrow-{c[1:]}" viewBox="0 0 10 10" refX="10" refY="5" '
            'markerWidth="9" markerHeight="9" markerUnits="userSpaceOnUse" orient="auto">'
            f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>'
            for c in sorted(self.colours)
        ]
        return ["<defs>", *heads, "</defs>"]

    def document(self, parts: list[str]) -> str:
        return _document(self.width, self.height, parts)


def _document(width: float, height: float, parts: list[str]) -> str:
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">',
            f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>',
            *parts,
            "</svg>",
            "",
        ]
    )


def _bezier(a, c, b, t: float) -> tuple[float, float]:
    u = 1 - t
    return (
        u * u * a[0] + 2 * u * t * c[0] + t * t * b[0],
        u * u * a[1] + 2 * u * t * c[1] + t * t * b[1],
    )


def _inside(point, centre, margin: float = 0.04) -> bool:
    rx, ry = NODE_SIZE[0] / 2 + margin, NODE_SIZE[1] / 2 + margin
    return ((point[0] - centre[0]) / rx) ** 2 + ((point[1] - centre[1]) / ry) ** 2 < 1


def _exit(a, c, b, centre, leaving: bool) -> float:
    """Return the curve parameter where the curve crosses the ellipse of the node at `centre`: where it
    leaves the source node (leaving) or enters the target node, by bisection."""
    inner, outer = (0.0, 0.5) if leaving else (1.0, 0.5)
    if _inside(_bezier(a, c, b, outer), centre):
        return outer
    for _ in range(30):
        middle = (inner + outer) / 2
        if _inside(_bezier(a, c, b, middle), centre):
            inner = middle
        else:
            outer = middle
    return outer


def _sub_curve(a, c, b, t0: float, t1: float):
    """Return the end points and control point of the part of a quadratic Bezier between t0 and t1."""
    u0, u1 = 1 - t0, 1 - t1
    control = tuple(u0 * u1 * a[k] + (u0 * t1 + t0 * u1) * c[k] + t0 * t1 * b[k] for k in range(2))
    return _bezier(a, c, b, t0), control, _bezier(a, c, b, t1)


# Architecture weights over a search


def write_edge_weights_svg(history: Sequence[Mapping], network: str, path: str | Path) -> Path:
    """Write the heatmaps of `edge_weights_svg` to `path` (an .svg file) and return it."""
    document = edge_weights_svg(history, network)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path


def edge_weights_svg(history: Sequence[Mapping], network: str) -> str:
    """Return how alpha (generator) or beta (discriminator) moved during a search, as SVG.

    `history` is a list of {"step": int, "weights": Search.edge_weights()}. One heatmap per cell:
    rows are (edge, candidate operation), columns are the recorded steps, colour is the softmax
    weight of the operation on its edge (viridis, 0 to 1). Each heatmap is a PNG embedded in the
    SVG, one pixel per value scaled up without smoothing, so long searches stay small files.
    """
    steps, panels = weight_tables(history, network)
    rows = max(len(labels) for labels, _, _ in panels)
    row_height = 12
    column_width = max(2.0, min(14.0, 240 / len(steps)))
    matrix_width = column_width * len(steps)
    label_width = max(_text_width(label, 9) for labels, _, _ in panels for label in labels) + 8
    panel_width = label_width + matrix_width + 24
    header, footer = 56, 44
    width = panel_width * len(panels) + 80
    height = header + rows * row_height + footer

    symbol = "alpha" if network == "generator" else "beta"
    parts = [
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="15">{symbol} '
        f"({network}): softmax weight of each operation per edge</text>"
    ]
    ticks = thin_ticks(len(steps), 8)
    for i, (labels, matrix, bounds) in enumerate(panels):
        left = i * panel_width + label_width
        parts.append(
            f'<text x="{left + matrix_width / 2:.1f}" y="{header - 10}" text-anchor="middle" '
            f'font-size="12">cell {i}</text>'
        )
        # Whole pixels per value, so viewers that smooth scaled images blur only the borders.
        columns, rows_shown = matrix.shape[1] * round(column_width), matrix.shape[0] * row_height
        picture = _colour(matrix).resize((columns, rows_shown), Image.Resampling.NEAREST)
        parts.append(
            f'<image x="{left:.1f}" y="{header}" width="{matrix_width:.1f}" '
            f'height="{rows_shown}" preserveAspectRatio="none" '
            'style="image-rendering:pixelated" '
            f'href="data:image/png;base64,{_png_base64(picture)}"/>'
        )
        for bound in bounds:
            y = header + bound * row_height
            parts.append(
                f'<line x1="{left:.1f}" y1="{y}" x2="{left + matrix_width:.1f}" y2="{y}" '
                'stroke="white" stroke-width="1.5"/>'
            )
        for r, label in enumerate(labels):
            parts.append(
                f'<text x="{left - 4:.1f}" y="{header + (r + 0.5) * row_height:.1f}" '
                f'text-anchor="end" dominant-baseline="central" font-size="9" '
                f'xml:space="preserve">{escape(label)}</text>'
            )
        bottom = header + rows_shown
        for t in ticks:
            x = left + (t + 0.5) * column_width
            parts.append(
                f'<text x="{x:.1f}" y="{bottom + 12}" text-anchor="middle" '
                f'font-size="9">{steps[t]}</text>'
            )
        parts.append(
            f'<text x="{left + matrix_width / 2:.1f}" y="{bottom + 28}" text-anchor="middle" '
            'font-size="10">step</text>'
        )
    parts.extend(_colour_bar(width - 60, header, rows * row_height))
    return _document(width, height, parts)


def _colour_bar(x: float, y: float, height: float) -> list[str]:
    stops = "".join(
        f'<stop offset="{k / (len(VIRIDIS) - 1):.4f}" stop-color="{c}"/>'
        for k, c in enumerate(reversed(VIRIDIS))
    )
    parts = [
        f'<defs><linearGradient id="viridis" x1="0" y1="0" x2="0" y2="1">{stops}'
        "</linearGradient></defs>",
        f'<rect x="{x:.1f}" y="{y}" width="12" height="{height}" fill="url(#viridis)"/>',
    ]
    for value in (0.0, 0.5, 1.0):
        ty = y + (1 - value) * height
        parts.append(
            f'<text x="{x + 16:.1f}" y="{ty:.1f}" dominant-baseline="central" '
            f'font-size="9">{value:g}</text>'
        )
    return parts


def _colour(matrix: np.ndarray) -> Image.Image:
    """Return the viridis colours of values in [0, 1], as an RGB image with one pixel per value."""
    anchors = np.array([[int(c[k : k + 2], 16) for k in (1, 3, 5)] for c in VIRIDIS], float)
    position = np.clip(np.nan_to_num(matrix, nan=0.0), 0, 1) * (len(VIRIDIS) - 1)
    low = np.minimum(position.astype(int), len(VIRIDIS) - 2)
    fraction = (position - low)[..., None]
    rgb = anchors[low] * (1 - fraction) + anchors[low + 1] * fraction
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def weight_tables(history: Sequence[Mapping], network: str):
    """Return the recorded steps and, per cell, its row labels, the (rows, steps) matrix of softmax
    weights and the row indices where a new edge starts.

    Raises ConfigError for an unknown network and ValueError for an empty or inconsistent
    history.
    """
    if network not in NETWORKS:
        raise ConfigError(f"network: expected one of {', '.join(NETWORKS)}, got {network!r}")
    if not history:
        raise ValueError("edge-weight history is empty: nothing to draw")
    steps = [int(entry["step"]) for entry in history]
    panels = [_weight_table(history, network, i) for i in range(NUM_CELLS[network])]
    return steps, panels


def _weight_table(history, network: str, i: int):
    labels, rows, bounds = [], [], []
    for edge in EDGES[network]:
        ops = candidates(network, i, edge)
        if rows:
            bounds.append(len(rows))
        columns = []
        for entry in history:
            weights = entry["weights"][network][i][edge.name]
            if len(weights) != len(ops):
                raise ValueError(
                    f"step {entry['step']}: {network} cell {i} edge {edge.name} has "
                    f"{len(weights)} weights, expected {len(ops)} ({', '.join(ops)})"
                )
            columns.append(weights)
        table = np.asarray(columns, dtype=float).T  # (ops, steps)
        for op, row in zip(ops, table, strict=True):
            labels.append(f"{edge.name}  {op}")
            rows.append(row)
    return labels, np.stack(rows), bounds


def thin_ticks(count: int, maximum: int) -> list[int]:
    """Return at most about `maximum` evenly spaced indices out of `count`, starting at 0."""
    stride = max(1, math.ceil(count / maximum))
    return list(range(0, count, stride))
