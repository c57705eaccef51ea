"""Write one self-contained HTML report of a launch: `python runner/report.py OUTPUT_DIR`.

Also the console script `anas-report`. The report is OUTPUT_DIR/report.html: the leaderboard
with each FID's protocol, the cell diagrams of every genotype, sample grids, loss and FID curves
of every trial and the composed config. Images are inlined as base64 data URIs, so the file
needs no server, stylesheet or script.

Inputs in OUTPUT_DIR: leaderboard.csv (required), config.yaml, genotypes/*-generator.json and
*-discriminator.json, and launch.json ({"tracking_uri", "experiment_id", "parent_run_id"}), which
locates the MLflow child runs of the launch. Whatever is missing or unreachable is listed at the
top of the report instead of failing it.

Exit status: 0 on success; 2 on invalid input, with one line `error: <message>` on stderr.
"""

import argparse
import base64
import contextlib
import csv
import html
import json
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

if __package__ in (None, ""):
    # Run as a script: Python put runner/ on sys.path, but the packages live one level up.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from PIL import Image  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from anas.diagrams import draw_curves, draw_edge_weights, draw_genotype  # noqa: E402
from anas.errors import ConfigError  # noqa: E402
from anas.genotypes import Genotype, load_genotype  # noqa: E402

log = logging.getLogger("runner.report")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("alembic", "mlflow", "urllib3", "matplotlib", "PIL")

REPORT_FILE = "report.html"
LAUNCH_FIELDS = ("tracking_uri", "experiment_id", "parent_run_id")
REQUIRED_COLUMNS = ("rank", "candidate", "fid", "protocol")
# Leaderboard columns shown as they are, never reformatted as numbers.
VERBATIM_COLUMNS = {"rank", "genotype", "candidate", "seed", "protocol", "device", "mlflow_run_id"}

# Errors of a tracking store that is unreachable, missing or broken.
STORE_ERRORS = (MlflowException, SQLAlchemyError, OSError)
CSS_DPI = 96  # CSS pixels per inch
HTTP_TIMEOUT_S = 10  # per request to a tracking server; MLflow reads it as whole seconds
STAGES = ("search", "retrain")

# Image artifacts named by MLflow's log_image(key=..., step=...): "<key>+step+<step>+timestamp+...".
# MLflow 3.17 uses "+" because "%" clashed with URL encoding, so older stores may contain "%".
MLFLOW_IMAGE_NAME = re.compile(r"^(?P<key>.+?)[+%]step[+%](?P<step>\d+)[+%]")
# Other image files may end in a step after a separator: "samples_000100", "samples_step00000100".
TRAILING_STEP = re.compile(r"^(?P<key>.*?)(?:[_-]step|step|[_-])(?P<step>\d+)$")


@dataclass
class RunRecord:
    """One MLflow child run of the launch, with what the report shows of it."""

    run_id: str
    name: str
    stage: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: list[tuple[str, int, Path]] = field(default_factory=list)  # (key, step, local file)
    edge_history: list | None = None  # the search's alpha/beta history from edge_weights.json
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The stage, candidate and seed, e.g. "retrain / searched-1a2b / seed 0"."""
        return f"{self.stage} / {self.short_label}"

    @property
    def short_label(self) -> str:
        """The candidate and seed, or the run name when the run has neither tag."""
        candidate = self.tags.get("source") or self.params.get("candidate")
        seed = self.tags.get("seed") or self.params.get("seed")
        parts = [candidate] if candidate else []
        if seed is not None:
            parts.append(f"seed {seed}")
        return " / ".join(parts) or self.name


@dataclass
class Inputs:
    """Files read from a launch's output folder."""

    folder: Path
    config_text: str | None
    config: dict
    columns: list[str]
    rows: list[dict[str, str]]
    genotypes: dict[str, dict[str, Genotype]]  # candidate label -> {"generator": ..., ...}
    launch: dict | None
    notices: list[str]


# Reading the output folder


def read_inputs(folder: Path) -> Inputs:
    """Read the files of an output folder; raise ConfigError for a missing folder or leaderboard
    and for files that exist but cannot be parsed."""
    if not folder.is_dir():
        raise ConfigError(f"output_dir: {folder} is not a directory; pass a launch's output_dir")
    notices: list[str] = []
    columns, rows = read_leaderboard(folder / "leaderboard.csv")
    if not rows:
        notices.append("leaderboard.csv has no rows: no retrain trial finished.")

    config_path = folder / "config.yaml"
    config_text, config = None, {}
    if config_path.is_file():
        config_text = config_path.read_text(encoding="utf-8")
        try:
            config = yaml.safe_load(config_text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{config_path}: invalid YAML: {error}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{config_path}: expected a mapping of config keys")
    else:
        notices.append(f"config.yaml not found in {folder}: the composed config is missing.")

    genotypes = read_genotypes(folder / "genotypes")
    if not genotypes:
        notices.append("no genotypes/*-generator.json files: cell diagrams are missing.")

    launch = read_launch(folder / "launch.json")
    if launch is None:
        notices.append("launch.json not found: MLflow runs, curves and sample grids are missing.")
    return Inputs(folder, config_text, config, columns, rows, genotypes, launch, notices)


def read_leaderboard(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise ConfigError(
            f"{path}: leaderboard.csv not found; the launch has not finished its retrain stage"
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"{path}: missing columns {', '.join(missing)}")
        rows = [dict(row) for row in reader]
    return columns, rows


def read_genotypes(folder: Path) -> dict[str, dict[str, Genotype]]:
    found: dict[str, dict[str, Genotype]] = {}
    if not folder.is_dir():
        return found
    for network in ("generator", "discriminator"):
        for path in sorted(folder.glob(f"*-{network}.json")):
            label = path.name[: -len(f"-{network}.json")]
            found.setdefault(label, {})[network] = load_genotype(path)
    return found


def read_launch(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object with {', '.join(LAUNCH_FIELDS)}")
    for key in LAUNCH_FIELDS:
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{path}: field {key!r} is missing or not a string")
    return data


# Reading MLflow


def missing_store(uri: str) -> str | None:
    """Return why a local tracking store cannot be read, or None when it can be.

    MlflowClient would create an empty database or folder at a missing local path, so the
    report checks first rather than writing next to someone's files.
    """
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        return None if path.is_file() else f"tracking store {path} not found"
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else uri)
        return None if path.is_dir() else f"tracking folder {path} not found"
    return None


@contextlib.contextmanager
def client_settings():
    """Make MLflow's client give up at once on an unreachable server and draw no progress bars.

    By default MLflow retries each HTTP request 7 times with exponential backoff, minutes in
    all. Values already in the environment are kept, and the environment is restored afterwards.
    """
    defaults = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def fetch_runs(launch: dict, workdir: Path, notices: list[str]) -> list[RunRecord]:
    """Read the child runs of the launch's parent run, their metric histories and images."""
    uri = launch["tracking_uri"]
    problem = missing_store(uri)
    if problem:
        notices.append(f"{problem}: MLflow runs, curves and sample grids are missing.")
        return []
    with client_settings():
        try:
            client = MlflowClient(tracking_uri=uri)
            parent = client.get_run(launch["parent_run_id"])
            log.info("reading child runs of %s from %s", parent.info.run_id, uri)
            children = child_runs(client, launch["experiment_id"], parent.info.run_id)
        except STORE_ERRORS as error:
            log.warning("could not read MLflow at %s: %s", uri, error)
            notices.append(
                f"MLflow at {uri} could not be read ({_first_line(error)}): "
                "runs, curves and sample grids are missing."
            )
            return []
        if not children:
            notices.append(f"parent run {parent.info.run_id} has no child runs in {uri}.")
        records = []
        for i, run in enumerate(children):
            record = _record(run)
            log.info("run %d/%d: %s (%s)", i + 1, len(children), record.label, record.run_id)
            try:
                load_run_details(client, record, workdir / record.run_id)
            except STORE_ERRORS as error:
                log.warning("could not read run %s: %s", record.run_id, error)
                record.missing.append(f"could not read its metrics or artifacts: {error}")
            records.append(record)
    return records


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
            max_results=500,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    order = {stage: i for i, stage in enumerate(STAGES)}
    return sorted(runs, key=lambda r: order.get(r.data.tags.get("stage", ""), len(order)))


def _record(run) -> RunRecord:
    tags = dict(run.data.tags)
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id),
        stage=tags.get("stage", "unknown stage"),
        status=run.info.status,
        tags=tags,
        params=dict(run.data.params),
    )


def load_run_details(client: MlflowClient, record: RunRecord, folder: Path) -> None:
    """Fill in metric histories, the latest image of each image key and edge weights."""
    run = client.get_run(record.run_id)
    for key in sorted(run.data.metrics):
        if key.endswith("_loss") or key in ("fid", "is", "kid") or key.endswith("_entropy"):
            history = client.get_metric_history(record.run_id, key)
            record.histories[key] = sorted((m.step, m.value) for m in history)

    files = list(_artifact_files(client, record.run_id, None))
    latest: dict[str, tuple[int, str]] = {}
    for path in files:
        if not path.lower().endswith(".png"):
            continue
        key, step = image_key(path)
        if key not in latest or step > latest[key][0]:
            latest[key] = (step, path)
    for key, (step, path) in sorted(latest.items()):
        local = client.download_artifacts(record.run_id, path, str(folder))
        record.images.append((key, step, Path(local)))

    if "edge_weights.json" in files:
        local = client.download_artifacts(record.run_id, "edge_weights.json", str(folder))
        try:
            record.edge_history = json.loads(Path(local).read_text(encoding="utf-8"))["history"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            record.missing.append(f"edge_weights.json is unreadable ({error!r})")


def _artifact_files(client: MlflowClient, run_id: str, path: str | None):
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            yield from _artifact_files(client, run_id, item.path)
        else:
            yield item.path


def image_key(path: str) -> tuple[str, int]:
    """Group an image artifact with the other steps of the same picture: (key, step), with
    step -1 for an image that has none."""
    name = PurePosixPath(path)
    match = MLFLOW_IMAGE_NAME.match(name.name)
    if match:
        return match["key"], int(match["step"])
    folder = name.parent.as_posix()
    if name.stem.isdigit():
        return folder, int(name.stem)
    match = TRAILING_STEP.match(name.stem)
    prefix = "" if folder in ("", ".") else folder + "/"
    if match:
        return prefix + (match["key"] or name.parent.name), int(match["step"])
    return prefix + name.stem, -1


def is_sample_grid(key: str) -> bool:
    return "sample" in key.lower()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# Drawing


def draw_run_figures(record: RunRecord, folder: Path) -> dict[str, Path]:
    """Loss, FID and entropy curves of one run and, for a search, alpha and beta heatmaps."""
    figures: dict[str, Path] = {}
    folder.mkdir(parents=True, exist_ok=True)
    losses = {k: v for k, v in record.histories.items() if k.endswith("_loss")}
    if losses:
        figures["losses"] = draw_curves(losses, folder / "losses.png", "losses", "loss")
    else:
        record.missing.append("no loss history")
    if record.histories.get("fid"):
        figures["fid"] = draw_curves(
            {"fid": record.histories["fid"]}, folder / "fid.png", "FID", "FID"
        )
    else:
        record.missing.append("no FID history")
    entropy = {k: v for k, v in record.histories.items() if k.endswith("_entropy")}
    if entropy:
        figures["entropy"] = draw_curves(
            entropy, folder / "entropy.png", "mean entropy of alpha and beta", "nats"
        )
    logged_heatmaps = any(
        word in key for key, _, _ in record.images for word in ("alpha", "beta", "edge_weights")
    )
    if record.edge_history and not logged_heatmaps:
        for network, symbol in (("generator", "alpha"), ("discriminator", "beta")):
            try:
                figures[symbol] = draw_edge_weights(
                    record.edge_history, network, folder / f"{symbol}.png"
                )
            except (ValueError, KeyError, IndexError, TypeError) as error:
                record.missing.append(f"{symbol} history could not be drawn ({error!r})")
    return figures


def draw_overview(records: list[RunRecord], stage: str, folder: Path) -> Path | None:
    """FID of every run of one stage in one plot."""
    series = {
        f"{r.short_label} ({r.run_id[:8]})": r.histories["fid"]
        for r in records
        if r.stage == stage and r.histories.get("fid")
    }
    if not series:
        return None
    return draw_curves(series, folder / f"fid_{stage}.png", f"FID during the {stage} stage", "FID")


def draw_genotypes(genotypes: dict[str, dict[str, Genotype]], folder: Path) -> dict:
    drawn: dict[str, dict[str, Path]] = {}
    for label, networks in genotypes.items():
        for network, genotype in networks.items():
            log.info("drawing %s %s", label, network)
            png, _ = draw_genotype(genotype, folder / f"{label}-{network}")
            drawn.setdefault(label, {})[network] = png
    return drawn


# HTML

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1500px; padding: 1.5em 2em; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin: 0.3em 0; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
th, td { border: 1px solid #d0d0d0; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f2f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef8ee; font-weight: 600; }
.meta td:first-child { color: #555; }
.notices { background: #fff6dd; border: 1px solid #e6c66b; padding: 0.6em 1em; border-radius: 6px; }
.notices li { margin: 0.2em 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 0.8em 1em; margin: 1em 0; }
.card.failed { border-color: #d99; background: #fff8f8; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; }
img.samples { width: 320px; image-rendering: pixelated; border: 1px solid #ccc; }
img.curve { width: 460px; }
.scroll { overflow-x: auto; }
.missing { color: #8a5a00; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; }
code { font-size: 0.9em; }
"""


def data_uri(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:image/png;base64,{encoded}"


def display_width(path: Path) -> int:
    """Width in CSS pixels that shows an image at the physical size it was drawn for, so text
    in every diagram appears at one size whatever the diagram's width."""
    with Image.open(path) as image:
        dpi = float(image.info.get("dpi", (CSS_DPI,))[0]) or CSS_DPI
        return round(image.width * CSS_DPI / dpi)


def img(path: Path, alt: str, css_class: str) -> str:
    width = f' width="{display_width(path)}"' if css_class in ("diagram", "heatmap") else ""
    return f'<img class="{css_class}"{width} alt="{html.escape(alt)}" src="{data_uri(path)}">'


def figure(path: Path, caption: str, css_class: str) -> str:
    return (
        f"<figure>{img(path, caption, css_class)}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def run_anchor(run_id: str) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_-]", "", run_id)


def format_cell(column: str, value: str) -> str:
    if column in VERBATIM_COLUMNS or value == "":
        return html.escape(value)
    try:
        number = float(value)
    except ValueError:
        return html.escape(value)
    if "hours" in column:
        return f"{number:.4f}"
    if number.is_integer() and abs(number) >= 1000:
        return f"{int(number):,}"
    return f"{number:.4g}"


def render_leaderboard(inputs: Inputs, run_ids: set[str]) -> str:
    if not inputs.rows:
        return "<p class='missing'>No ranked retrain trials.</p>"
    protocols = sorted({row["protocol"] for row in inputs.rows})
    parts = [
        "<p>Ranked by the FID of G_ema, lower is better. FID protocol: "
        + ", ".join(f"<code>{html.escape(p)}</code>" for p in protocols)
        + ".</p>"
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in inputs.columns)
    parts.append(
        f'<div class="scroll"><table class="leaderboard"><thead><tr>{head}</tr></thead><tbody>'
    )
    for row in inputs.rows:
        best = ' class="best"' if row.get("rank") == "1" else ""
        cells = []
        for column in inputs.columns:
            value = row.get(column) or ""
            text = format_cell(column, value)
            if column == "mlflow_run_id" and value:
                # 8 characters keep the table narrow; the title attribute contains the full id.
                short = f'<span title="{html.escape(value)}">{html.escape(value[:8])}</span>'
                linked = value in run_ids
                text = f'<a href="#{run_anchor(value)}">{short}</a>' if linked else short
            numeric = column not in VERBATIM_COLUMNS or column in ("rank", "seed")
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        parts.append(f"<tr{best}>{''.join(cells)}</tr>")
    parts.append("</tbody></table></div>")
    return "\n".join(parts)


def render_genotypes(inputs: Inputs, drawn: dict) -> str:
    if not drawn:
        return "<p class='missing'>No genotype files in genotypes/.</p>"
    ranks: dict[str, list[str]] = {}
    for row in inputs.rows:
        ranks.setdefault(row["candidate"], []).append(row["rank"])
    fixed_d = inputs.config.get("retrain", {}).get("discriminator") == "autogan"
    parts = []
    for label, networks in drawn.items():
        genotypes = inputs.genotypes[label]
        where = ", ".join(ranks.get(label, [])) or "not ranked"
        parts.append(f'<div class="card"><h3>{html.escape(label)}</h3>')
        parts.append(f"<p>Leaderboard ranks: {html.escape(where)}.</p>")
        for network in ("generator", "discriminator"):
            if network in networks:
                g = genotypes[network]
                caption = f"{network} {g.hash}"
                parts.append(figure(networks[network], caption, "diagram"))
            elif network == "discriminator":
                parts.append(
                    "<p class='missing'>No discriminator genotype: retrained with the fixed "
                    "AutoGAN-style discriminator.</p>"
                )
        if fixed_d and "discriminator" in networks:
            parts.append(
                "<p class='missing'>retrain.discriminator is autogan, so retraining used the "
                "fixed AutoGAN-style discriminator, not this searched one.</p>"
            )
        parts.append("</div>")
    return "\n".join(parts)


def render_run(record: RunRecord, figures: dict[str, Path], ranks: dict[str, str]) -> str:
    failed = record.status == "FAILED" or "failure" in record.tags
    parts = [f'<div class="card{" failed" if failed else ""}" id="{run_anchor(record.run_id)}">']
    rank = ranks.get(record.run_id)
    title = f"{record.label}" + (f" (rank {rank})" if rank else "")
    parts.append(f"<h3>{html.escape(title)}</h3>")
    info = f"run <code>{html.escape(record.run_id)}</code> ({html.escape(record.name)}), "
    info += f"status {html.escape(record.status)}"
    if "genotype_hash" in record.tags:
        info += f", generator genotype <code>{html.escape(record.tags['genotype_hash'])}</code>"
    if "failure" in record.tags:
        info += f", failure: {html.escape(record.tags['failure'])}"
    parts.append(f"<p>{info}</p>")

    blocks = []
    samples = [(k, s, p) for k, s, p in record.images if is_sample_grid(k)]
    for key, step, path in samples:
        blocks.append(figure(path, f"{key} at step {step}", "samples"))
    if not samples:
        record.missing.append("no sample grid logged")
    for name in ("losses", "fid", "entropy"):
        if name in figures:
            blocks.append(figure(figures[name], f"{name} ({record.label})", "curve"))
    parts.append(f'<div class="figures">{"".join(blocks)}</div>')
    for symbol in ("alpha", "beta"):
        if symbol in figures:
            parts.append(figure(figures[symbol], f"{symbol} during the search", "heatmap"))
    for key, step, path in record.images:
        if not is_sample_grid(key):
            caption = key if step < 0 else f"{key} at step {step}"
            parts.append(figure(path, caption, "diagram"))
    if record.missing:
        parts.append(f"<p class='missing'>Missing: {html.escape('; '.join(record.missing))}.</p>")
    parts.append("</div>")
    return "\n".join(parts)


def render_html(
    inputs: Inputs,
    records: list[RunRecord],
    run_figures: dict[str, dict[str, Path]],
    overviews: dict[str, Path],
    diagrams: dict,
) -> str:
    cfg = inputs.config
    title = f"AdversarialNAS report: {cfg.get('exp_name') or inputs.folder.name}"
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = [("output folder", str(inputs.folder.resolve())), ("report written", created)]
    data = cfg.get("data") or {}
    if data:
        meta.append(("data", f"{data.get('name')}, {data.get('img_size')} px, {data.get('split')}"))
    if cfg.get("budget_name"):
        meta.append(("budget", str(cfg["budget_name"])))
    if inputs.launch:
        meta.append(("MLflow tracking URI", inputs.launch["tracking_uri"]))
        meta.append(("MLflow experiment id", inputs.launch["experiment_id"]))
        meta.append(("MLflow parent run", inputs.launch["parent_run_id"]))
    counts = {stage: sum(r.stage == stage for r in records) for stage in STAGES}
    meta.append(("child runs", ", ".join(f"{n} {stage}" for stage, n in counts.items())))

    ranks = {row.get("mlflow_run_id", ""): row["rank"] for row in inputs.rows}
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<table class="meta">',
    ]
    out += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in meta]
    out.append("</table>")
    if inputs.notices:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in inputs.notices)
        out.append(
            f'<div class="notices"><strong>Missing from this report</strong><ul>{items}</ul></div>'
        )

    out.append('<h2 id="leaderboard">Leaderboard</h2>')
    out.append(render_leaderboard(inputs, {r.run_id for r in records}))
    if overviews:
        out.append('<div class="figures">')
        for stage, path in overviews.items():
            out.append(figure(path, f"FID of every {stage} trial", "curve"))
        out.append("</div>")

    out.append('<h2 id="architectures">Architectures</h2>')
    out.append(render_genotypes(inputs, diagrams))

    for stage in STAGES:
        stage_records = [r for r in records if r.stage == stage]
        if not stage_records:
            continue
        out.append(f'<h2 id="{stage}">{stage.capitalize()} trials</h2>')
        for record in stage_records:
            out.append(render_run(record, run_figures[record.run_id], ranks))
    others = [r for r in records if r.stage not in STAGES]
    if others:
        out.append('<h2 id="other">Other runs</h2>')
        out += [render_run(r, run_figures[r.run_id], ranks) for r in others]

    out.append('<h2 id="config">Composed config</h2>')
    if inputs.config_text is not None:
        out.append(f"<pre>{html.escape(inputs.config_text)}</pre>")
    else:
        out.append("<p class='missing'>config.yaml not found.</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# Writing


def write_report(output_dir: str | os.PathLike) -> Path:
    """Write OUTPUT_DIR/report.html atomically and return its path."""
    folder = Path(output_dir)
    inputs = read_inputs(folder)
    with tempfile.TemporaryDirectory(prefix="anas-report-") as tmp:
        work = Path(tmp)
        records = (
            fetch_runs(inputs.launch, work / "artifacts", inputs.notices) if inputs.launch else []
        )
        log.info("drawing curves of %d runs", len(records))
        run_figures = {r.run_id: draw_run_figures(r, work / "figures" / r.run_id) for r in records}
        overviews = {}
        for stage in STAGES:
            path = draw_overview(records, stage, work / "figures")
            if path:
                overviews[stage] = path
        diagrams = draw_genotypes(inputs.genotypes, work / "genotypes")
        text = render_html(inputs, records, run_figures, overviews, diagrams)

    # A temporary file beside the target, then a rename: readers never see half a report. It is
    # created with open(), not mkstemp, so the report gets the usual umask permissions.
    target = folder / REPORT_FILE
    tmp_path = folder / f".{REPORT_FILE}.{os.getpid()}.tmp"
    try:
        tmp_path.write_text(text, encoding="utf-8")
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def configure_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anas-report",
        description="Write OUTPUT_DIR/report.html: one self-contained HTML report of a launch.",
    )
    parser.add_argument("output_dir", help="the output_dir of a launch (contains leaderboard.csv)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        path = write_report(args.output_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
