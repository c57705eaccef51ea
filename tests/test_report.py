import base64
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from torchvision.utils import make_grid

from anas.genotypes import load_shipped, save_genotype
from anas.search import Search
from runner.report import image_key, main
from runner.stages import LEADERBOARD_COLUMNS

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"


def sample_grid(search: Search) -> Image.Image:
    images = search.sample(16).add(1).div(2).clamp(0, 1)  # (16, 3, 16, 16) in [0, 1]
    grid = make_grid(images, nrow=4, padding=1)  # (3, H, W)
    array = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = {
    "exp_name": "digits",
    "budget_name": "smoke",
    "output_dir": "outputs/digits/test",
    "data": {"name": "digits", "img_size": 16, "channels": 3, "split": "train"},
    "model": {"latent_dim": 6, "g_channels": 4, "d_channels": 4},
    "retrain": {"discriminator": "searched", "seeds": [0, 1]},
    "metrics": {"extractor": "digits-classifier", "n_generated": 64},
}
PROTOCOL = "fid64_digits-classifier_train_16px"


def build_output_dir(folder: Path, search: Search) -> dict:
    """A launch's output folder with a real MLflow SQLite store: one search child run with
    losses, FID, entropies, sample grids and alpha/beta history, two ranked retrain child runs
    and one failed retrain child run."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))

    # Genotypes: a shipped baseline and a searched generator and discriminator pair.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*search.G.alpha.values(), *search.D.beta.values()]:
            p.copy_(3 * torch.randn(p.shape, generator=gen))
    searched_g, searched_d = search.genotypes()
    baseline = load_shipped("adversarialnas-cifar10")
    searched = f"searched-{searched_g.hash}-{searched_d.hash}"
    save_genotype(searched_g, folder / "genotypes" / f"{searched}-generator.json")
    save_genotype(searched_d, folder / "genotypes" / f"{searched}-discriminator.json")
    save_genotype(baseline, folder / "genotypes" / "baseline-adversarialnas-cifar10-generator.json")

    # The tracking store: a parent run and its child runs.
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(
        "report-test", artifact_location=(folder / "mlartifacts").as_uri()
    )
    parent = client.create_run(experiment_id, run_name="launch").info.run_id

    def child(name: str, tags: dict) -> str:
        tags = {"mlflow.parentRunId": parent, **tags}
        return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    search_run = child("search_trial_0", {"stage": "search", "seed": "0"})
    history = []
    for step in (1, 2, 3, 4):
        client.log_metric(search_run, "d_loss", 2.0 - 0.1 * step, step=step)
        client.log_metric(search_run, "g_loss", 0.5 + 0.1 * step, step=step)
        client.log_metric(search_run, "d_arch_loss", 1.9 - 0.1 * step, step=step)
        client.log_metric(search_run, "g_arch_loss", 0.4 + 0.1 * step, step=step)
        if step % 2 == 0:
            client.log_metric(search_run, "fid", 300.0 - 20 * step, step=step)
            client.log_metric(search_run, "alpha_entropy", 1.9 - 0.1 * step, step=step)
            client.log_metric(search_run, "beta_entropy", 1.8 - 0.1 * step, step=step)
            client.log_image(search_run, sample_grid(search), key="samples", step=step)
            history.append({"step": step, "weights": search.edge_weights()})
            with torch.no_grad():
                for p in search.G.alpha.values():
                    p.add_(torch.randn(p.shape, generator=gen))
    client.log_dict(search_run, {"history": history}, "edge_weights.json")
    client.set_tag(search_run, "genotype_hash", searched_g.hash)
    client.set_terminated(search_run, "FINISHED")

    labels = {searched: (0, 40.0), "baseline-adversarialnas-cifar10": (0, 55.0)}
    retrain_runs = {}
    for label, (seed, final_fid) in labels.items():
        tags = {"stage": "retrain", "seed": str(seed), "source": label}
        run_id = child(f"retrain_{label[:12]}", tags)
        for step in range(1, 7):
            client.log_metric(run_id, "d_loss", 1.5 - 0.05 * step, step=step)
            client.log_metric(run_id, "g_loss", 0.8 + 0.05 * step, step=step)
            if step % 3 == 0:
                client.log_metric(run_id, "fid", final_fid + 30 / step, step=step)
                client.log_image(run_id, sample_grid(search), key="samples", step=step)
        client.set_terminated(run_id, "FINISHED")
        retrain_runs[label] = run_id

    # A retrain trial that stopped on a NaN: losses only, no FID, no grid, not ranked.
    tags = {"stage": "retrain", "seed": "1", "source": searched, "failure": "non-finite: g_loss"}
    failed_run = child("retrain_failed", tags)
    client.log_metric(failed_run, "d_loss", 1.0, step=1)
    client.log_metric(failed_run, "g_loss", 1.0, step=1)
    client.set_terminated(failed_run, "FAILED")
    client.set_terminated(parent, "FINISHED")

    rows = []
    ranked = sorted(labels.items(), key=lambda item: item[1][1])
    for rank, (label, (seed, final_fid)) in enumerate(ranked, start=1):
        row = dict.fromkeys(LEADERBOARD_COLUMNS, "")
        row |= {
            "rank": rank,
            "genotype": searched_g.hash if label == searched else baseline.hash,
            "candidate": label,
            "seed": seed,
            "fid": final_fid + 5.0,
            "protocol": PROTOCOL,
            "is": 2.5,
            "kid": 0.01,
            "generator_parameters": 12345,
            "search_device_hours": 0.001,
            "retrain_device_hours": 0.002,
            "device": "cpu",
            "mlflow_run_id": retrain_runs[label],
        }
        rows.append(row)
    with (folder / "leaderboard.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LEADERBOARD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    launch = {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent}
    (folder / "launch.json").write_text(json.dumps(launch))
    return {
        "rows": rows,
        "search_run": search_run,
        "retrain_runs": retrain_runs,
        "failed_run": failed_run,
        "uri": uri,
    }


class ReportParser(HTMLParser):
    """The parts of the report the tests check: images, leaderboard rows, notices."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.rows: list[list[str]] = []
        self.notices: list[str] = []
        self.scripts = 0
        self.links = 0
        self._in_leaderboard = self._in_body = self._in_notices = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "table" and attrs.get("class") == "leaderboard":
            self._in_leaderboard = True
        elif tag == "tbody" and self._in_leaderboard:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "div" and attrs.get("class") == "notices":
            self._in_notices = True
        elif tag == "li" and self._in_notices:
            self.notices.append("")
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.links += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_leaderboard = self._in_body = False
        elif tag == "div":
            self._in_notices = False

    def handle_data(self, data):
        if self._in_body and self.rows:
            self.rows[-1].append(data)
        if self._in_notices and self.notices:
            self.notices[-1] += data

    def of_class(self, name: str) -> list[dict]:
        return [i for i in self.images if i.get("class") == name]


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory, tiny_search):
    folder = tmp_path_factory.mktemp("launch") / "out"
    facts = build_output_dir(folder, tiny_search())
    assert main([str(folder)]) == 0
    return folder, facts


@pytest.fixture(scope="module")
def report(launch_dir):
    folder, _ = launch_dir
    return parse(folder / "report.html")


def copy_without_store(launch_dir, tmp_path) -> Path:
    """The launch folder without its MLflow database, for the tests that change launch.json."""
    folder = tmp_path / "out"
    shutil.copytree(launch_dir[0], folder, ignore=shutil.ignore_patterns("mlflow.db", "report*"))
    return folder


# A full report


def test_report_leaderboard_rows(launch_dir, report):
    _, facts = launch_dir
    assert len(report.rows) == len(facts["rows"])
    for cells, row in zip(report.rows, facts["rows"], strict=True):
        assert cells[0] == str(row["rank"])
        assert row["candidate"] in cells
        assert row["mlflow_run_id"][:8] in cells
        assert PROTOCOL in cells


def test_report_fid_formatted(report):
    assert "45" in report.rows[0]
    assert "60" in report.rows[1]


def test_report_images_inline(report):
    assert report.images
    for image in report.images:
        assert image["src"].startswith(DATA_URI)
        assert base64.b64decode(image["src"][len(DATA_URI) :]).startswith(PNG_SIGNATURE)


def test_report_sample_grids(report):
    # The latest grid of each of the three runs.
    samples = report.of_class("samples")
    assert len(samples) == 3
    assert all("at step" in s["alt"] for s in samples)


def test_report_sample_grid_latest(report):
    steps = sorted(int(re.search(r"step (\d+)", s["alt"])[1]) for s in report.of_class("samples"))
    assert steps == [4, 6, 6]


def test_report_curves(report):
    # Losses per run, FID per run that has one, entropy for the search run, FID overviews.
    alts = [c["alt"] for c in report.of_class("curve")]
    assert sum(a.startswith("losses") for a in alts) == 4
    assert sum(a.startswith("fid") for a in alts) == 3
    assert sum(a.startswith("entropy") for a in alts) == 1
    assert sum(a.startswith("FID of every") for a in alts) == 2


def test_report_cell_diagrams(report):
    # Baseline generator, searched generator and searched discriminator.
    alts = sorted(d["alt"].split()[0] for d in report.of_class("diagram"))
    assert alts == ["discriminator", "generator", "generator"]


def test_report_heatmaps(report):
    alts = sorted(h["alt"] for h in report.of_class("heatmap"))
    assert alts == ["alpha during the search", "beta during the search"]


def test_report_self_contained(launch_dir, report):
    folder, _ = launch_dir
    text = (folder / "report.html").read_text()
    assert report.scripts == 0
    assert report.links == 0
    assert "http://" not in text
    assert "https://" not in text


def test_report_config_included(launch_dir):
    folder, _ = launch_dir
    text = (folder / "report.html").read_text()
    assert "budget_name: smoke" in text


def test_report_run_links(launch_dir):
    folder, facts = launch_dir
    text = (folder / "report.html").read_text()
    for run_id in facts["retrain_runs"].values():
        assert f'href="#run-{run_id}"' in text
        assert f'id="run-{run_id}"' in text


def test_report_failed_run(launch_dir):
    folder, facts = launch_dir
    text = (folder / "report.html").read_text()
    card = text[text.index(f'id="run-{facts["failed_run"]}"') :]
    card = card.split('<div class="card', 1)[0].split("<h2", 1)[0]
    assert '<div class="card failed"' in text
    assert "failure: non-finite: g_loss" in card
    assert "Missing: no FID history; no sample grid logged." in card


def test_report_no_notices(report):
    assert report.notices == []


def test_report_no_temporary_files(launch_dir):
    folder, _ = launch_dir
    assert not list(folder.glob(".report.html.*"))


# Missing inputs are listed in the report, not fatal


def test_report_unreachable_server(launch_dir, tmp_path):
    folder = copy_without_store(launch_dir, tmp_path)
    launch = json.loads((folder / "launch.json").read_text())
    launch["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    (folder / "launch.json").write_text(json.dumps(launch))
    assert main([str(folder)]) == 0
    report = parse(folder / "report.html")
    assert len(report.rows) == 2
    assert len(report.of_class("diagram")) == 3
    assert report.of_class("samples") == []
    assert len(report.notices) == 1
    assert "could not be read" in report.notices[0]


def test_report_store_not_found(launch_dir, tmp_path):
    folder = copy_without_store(launch_dir, tmp_path)
    launch = json.loads((folder / "launch.json").read_text())
    launch["tracking_uri"] = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "launch.json").write_text(json.dumps(launch))
    assert main([str(folder)]) == 0
    report = parse(folder / "report.html")
    assert "not found" in report.notices[0]
    assert not (folder / "mlflow.db").exists()


def test_report_without_launch_json(launch_dir, tmp_path):
    folder = copy_without_store(launch_dir, tmp_path)
    (folder / "launch.json").unlink()
    assert main([str(folder)]) == 0
    report = parse(folder / "report.html")
    assert report.notices == [
        "launch.json not found: MLflow runs, curves and sample grids are missing."
    ]


def test_report_without_genotypes_or_config(launch_dir, tmp_path):
    folder = copy_without_store(launch_dir, tmp_path)
    shutil.rmtree(folder / "genotypes")
    (folder / "config.yaml").unlink()
    assert main([str(folder)]) == 0
    notices = " ".join(parse(folder / "report.html").notices)
    assert "config.yaml not found" in notices
    assert "cell diagrams are missing" in notices


def test_report_empty_leaderboard(launch_dir, tmp_path):
    folder = copy_without_store(launch_dir, tmp_path)
    (folder / "leaderboard.csv").write_text(",".join(LEADERBOARD_COLUMNS) + "\n")
    assert main([str(folder)]) == 0
    report = parse(folder / "report.html")
    assert report.rows == []
    assert "leaderboard.csv has no rows" in " ".join(report.notices)


# Invalid input


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_report_missing_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert "is not a directory" in lines[0]


def test_report_missing_leaderboard(launch_dir, tmp_path, capsys):
    folder = copy_without_store(launch_dir, tmp_path)
    (folder / "leaderboard.csv").unlink()
    assert main([str(folder)]) == 2
    assert "leaderboard.csv not found" in error_lines(capsys)[0]
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.yaml",
        "genotypes",
        "launch.json",
        "mlartifacts",
    ]


def test_report_leaderboard_missing_column(launch_dir, tmp_path, capsys):
    folder = copy_without_store(launch_dir, tmp_path)
    (folder / "leaderboard.csv").write_text("rank,candidate\n1,x\n")
    assert main([str(folder)]) == 2
    assert "missing columns fid, protocol" in error_lines(capsys)[0]
    assert not (folder / "report.html").exists()


def test_report_invalid_launch_json(launch_dir, tmp_path, capsys):
    folder = copy_without_store(launch_dir, tmp_path)
    (folder / "launch.json").write_text('{"tracking_uri": "sqlite:///x.db"}')
    assert main([str(folder)]) == 2
    assert "'experiment_id' is missing" in error_lines(capsys)[0]


def test_report_invalid_genotype(launch_dir, tmp_path, capsys):
    folder = copy_without_store(launch_dir, tmp_path)
    path = next((folder / "genotypes").glob("baseline-*-generator.json"))
    path.write_text('{"schema_version": 1, "network": "generator", "img_size": 32, "cells": []}')
    assert main([str(folder)]) == 2
    assert "field 'cells'" in error_lines(capsys)[0]


def test_report_script_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "runner" / "report.py"), str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert result.stdout == ""


# Image artifact names


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("images/samples+step+10+timestamp+1796398842701+03856bcd.png", ("samples", 10)),
        ("images/samples%step%10%timestamp%1796398842701%03856bcd.png", ("samples", 10)),
        ("images/samples_step00000010.png", ("images/samples", 10)),
        ("samples/samples_000010.png", ("samples/samples", 10)),
        ("samples/000020.png", ("samples", 20)),
        ("diagrams/alpha.png", ("diagrams/alpha", -1)),
        (
            "diagrams/searched-bdce6f15a0c2-generator.png",
            ("diagrams/searched-bdce6f15a0c2-generator", -1),
        ),
        ("genotype_bdce6f15a0c2.png", ("genotype_bdce6f15a0c2", -1)),
    ],
)
def test_image_key(path, expected):
    assert image_key(path) == expected


# The report as a browser renders it

RENDER_CHECK = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0);
  const out = document.createElement("div");
  out.id = "render-check";
  out.setAttribute("data-images", images.length);
  out.setAttribute("data-loaded", loaded.length);
  out.setAttribute("data-curves", loaded.filter((i) => i.classList.contains("curve")).length);
  out.setAttribute("data-samples", loaded.filter((i) => i.classList.contains("samples")).length);
  out.setAttribute("data-rows", document.querySelectorAll("table.leaderboard tbody tr").length);
  document.body.appendChild(out);
});
</script>
"""


def chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium package to run this test")


def chromium_args(tmp_path: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]


@pytest.mark.services
def test_report_renders_in_chromium(launch_dir, tmp_path):
    chromium = chromium_or_skip()
    folder, facts = launch_dir
    page = tmp_path / "page.html"
    text = (folder / "report.html").read_text()
    page.write_text(text.replace("</body>", RENDER_CHECK + "</body>"))
    result = subprocess.run(
        [
            str(chromium),
            *chromium_args(tmp_path),
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    match = re.search(r'<div id="render-check"([^>]*)>', result.stdout)
    assert match, result.stderr[-2000:]
    found = dict(re.findall(r'data-(\w+)="(\d+)"', match[1]))
    assert int(found["images"]) == len(parse(folder / "report.html").images)
    assert found["loaded"] == found["images"]
    assert int(found["rows"]) == len(facts["rows"])
    assert int(found["samples"]) == 3
    assert int(found["curves"]) == 10
