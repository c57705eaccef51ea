"""The two Ray Tune stages of a launch, the hand-off between them and the leaderboard.

search stage  : Tuner(search_trial) over search.seeds x configurations sampled by Optuna
hand-off      : rank search trials by FID, merge identical genotypes, add baselines and files
retrain stage : Tuner(retrain_trial) over candidates x retrain.seeds, ranked by G_ema's FID
"""

import contextlib
import csv
import io
import json
import logging
import math
import sys
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from anas.errors import ConfigError
from anas.genotypes import genotype_from_dict, load_genotype, load_shipped, save_genotype
from runner.report import write_report
from runner.trials import WORST_FID, retrain_trial, search_trial

log = logging.getLogger(__name__)

# Columns of leaderboard.csv, in order.
LEADERBOARD_COLUMNS = [
    "rank",
    "genotype",
    "candidate",
    "seed",
    "fid",
    "protocol",
    "is",
    "kid",
    "generator_parameters",
    "search_device_hours",
    "retrain_device_hours",
    "device",
    "mlflow_run_id",
]


# Search space and the seeded searcher


def optuna_space(space: dict) -> dict:
    """Optuna distributions from `search.space` entries."""
    dists = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind in ("uniform", "loguniform"):
            dists[name] = optuna.distributions.FloatDistribution(
                spec["low"], spec["high"], log=kind == "loguniform"
            )
        elif kind == "int":
            dists[name] = optuna.distributions.IntDistribution(spec["low"], spec["high"])
        elif kind == "choice":
            dists[name] = optuna.distributions.CategoricalDistribution(list(spec["values"]))
        else:
            raise ConfigError(f"search.space.{name}.type: unknown type {kind!r}")
    return dists


class SeededSearch(Searcher):
    """Runs every configuration Optuna samples once per seed.

    Optuna sees one trial per configuration and learns the mean FID over its seeds; a seed that
    failed or reported a non-finite result counts as the worst FID.
    """

    def __init__(self, inner: Searcher, seeds: list[int], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.inner, self.seeds = inner, list(seeds)
        self.queue: list[tuple[str, dict, int]] = []
        self.base_of: dict[str, str] = {}  # Tune trial id -> Optuna trial id
        self.scores: dict[str, list[float]] = {}
        self.configurations = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        super().set_search_properties(metric, mode, config, **spec)
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if not self.queue:
            base = f"configuration_{self.configurations}"
            sampled = self.inner.suggest(base)
            if sampled is None or sampled == Searcher.FINISHED:
                return sampled
            self.configurations += 1
            self.queue = [(base, sampled, seed) for seed in self.seeds]
            self.scores[base] = []
        base, sampled, seed = self.queue.pop(0)
        self.base_of[trial_id] = base
        return {**sampled, "seed": seed}

    def on_trial_complete(self, trial_id, result=None, error=False):
        base = self.base_of.get(trial_id)
        if base is None:
            return
        value = (result or {}).get(self.metric)
        ok = not error and isinstance(value, int | float) and math.isfinite(value)
        self.scores[base].append(float(value) if ok else WORST_FID)
        if len(self.scores[base]) == len(self.seeds):
            mean = sum(self.scores[base]) / len(self.seeds)
            self.inner.on_trial_complete(base, {self.metric: mean})

    def get_state(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "inner"}
        return {"own": state, "inner": self.inner.get_state()}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state["own"])
        self.inner.set_state(state["inner"])


# Stages


def _stage_run_config(cfg: dict, name: str) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=cfg["storage"]["path"] or cfg["output_dir"],
        failure_config=tune.FailureConfig(max_failures=cfg["tune"]["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1,
    )


def _fit(tuner: tune.Tuner):
    # Ray Tune prints its trial table to stdout; stdout is for results, so move it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return tuner.fit()


def _restorable(cfg: dict, name: str) -> str | None:
    path = str(Path(cfg["storage"]["path"] or cfg["output_dir"]) / name)
    if cfg["resume"] and tune.Tuner.can_restore(path):
        return path
    return None


def result_rows(grid) -> list[dict]:
    """One row per trial: its config, last reported metrics and why it has no result, if so."""
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        failure = m.get("failure") or (repr(result.error) if result.error else None)
        if not failure and not m.get("completed"):
            failure = "stopped before its last iteration (early stopping)"
        rows.append({"config": result.config or {}, "metrics": m, "failure": failure})
    return rows


def run_search_stage(cfg: dict, tracking: dict, resources: dict) -> list[dict]:
    s = cfg["search"]
    planned = len(s["seeds"]) * s["num_samples"]
    log.info(
        "search stage: %d trials (%d seeds x %d configurations)",
        planned,
        len(s["seeds"]),
        s["num_samples"],
    )
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, launch=cfg, tracking=tracking), resources
    )
    path = _restorable(cfg, "search")
    if path:
        log.info("search stage: resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        optuna_search = OptunaSearch(
            space=optuna_space(s["space"]),
            metric="fid",
            mode="min",
            sampler=optuna.samplers.TPESampler(seed=s["seeds"][0]),
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=SeededSearch(optuna_search, s["seeds"], "fid", "min"),
                num_samples=planned,
                max_concurrent_trials=cfg["tune"]["max_concurrent"],
            ),
            run_config=_stage_run_config(cfg, "search"),
        )
    return result_rows(_fit(tuner))


def select_candidates(cfg: dict, search_rows: list[dict]) -> list[dict]:
    """The best distinct searched genotypes, then baselines and genotype files."""
    r = cfg["retrain"]
    with_d = r["discriminator"] == "searched"
    merged: dict[str, dict] = {}
    finished = [row for row in search_rows if not row["failure"]]
    for row in sorted(finished, key=lambda row: row["metrics"]["fid"]):
        m = row["metrics"]
        g = genotype_from_dict(json.loads(m["genotype_generator"]), "search trial result")
        d = genotype_from_dict(json.loads(m["genotype_discriminator"]), "search trial result")
        key = f"{g.hash}-{d.hash}" if with_d else g.hash
        entry = merged.setdefault(
            key,
            {
                "label": f"searched-{key}",
                "source": "search stage",
                "generator": g.to_dict(),
                "discriminator": d.to_dict() if with_d else None,
                "search_fid": m["fid"],
                "search_seeds": [],
                "search_device_seconds": 0.0,
                "search_device": m.get("device", "cpu"),
            },
        )
        entry["search_seeds"].append(int(row["config"]["seed"]))
        entry["search_device_seconds"] += float(m.get("device_seconds", 0.0))
    searched = list(merged.values())
    if not cfg["retrain"]["genotypes"] and not searched:
        raise RuntimeError("every search trial failed; see the search stage's errors above")
    if searched and r["top_k"] > len(searched):
        raise ConfigError(
            f"retrain.top_k: {r['top_k']} is larger than the {len(searched)} distinct genotypes "
            "the search stage found; lower retrain.top_k or add search.seeds"
        )
    candidates = searched[: r["top_k"]]
    for name in r["baselines"]:
        g = load_shipped(name)
        candidates.append(_fixed_candidate(f"baseline-{name}", f"shipped genotype {name}", g))
    for path in r["genotypes"]:
        candidates.extend(_genotype_files(Path(path)))
    return candidates


def _fixed_candidate(label: str, source: str, generator, discriminator=None) -> dict:
    return {
        "label": label,
        "source": source,
        "generator": generator.to_dict(),
        "discriminator": discriminator.to_dict() if discriminator else None,
        "search_fid": None,
        "search_seeds": [],
        "search_device_seconds": 0.0,
        "search_device": "",
    }


def _genotype_files(path: Path) -> list[dict]:
    """Candidates from a generator genotype file or the output folder of an earlier launch."""
    if path.is_dir():
        folder = path / "genotypes" if (path / "genotypes").is_dir() else path
        files = sorted(folder.glob("*generator.json"))
        if not files:
            raise ConfigError(f"retrain.genotypes: no *generator.json files in {folder}")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"retrain.genotypes: {path} does not exist")
    out = []
    for file in files:
        g = load_genotype(file)
        if g.network != "generator":
            raise ConfigError(
                f"retrain.genotypes: {file} holds a {g.network}, expected a generator"
            )
        partner = file.with_name(file.name.replace("generator.json", "discriminator.json"))
        d = load_genotype(partner) if partner.is_file() and partner != file else None
        out.append(_fixed_candidate(f"file-{g.hash}", str(file), g, d))
    return out


def write_candidates(cfg: dict, candidates: list[dict]) -> None:
    """Save each candidate's genotypes under output_dir/genotypes/ for later launches."""
    folder = Path(cfg["output_dir"]) / "genotypes"
    for c in candidates:
        extra = {"candidate": c["label"], "search_seeds": c["search_seeds"]}
        g = genotype_from_dict(c["generator"], c["label"])
        save_genotype(g, folder / f"{c['label']}-generator.json", extra)
        if c["discriminator"]:
            d = genotype_from_dict(c["discriminator"], c["label"])
            save_genotype(d, folder / f"{c['label']}-discriminator.json", extra)


def run_retrain_stage(cfg: dict, candidates: list[dict], tracking: dict, resources: dict):
    r = cfg["retrain"]
    planned = len(candidates) * len(r["seeds"])
    log.info(
        "retrain stage: %d trials (%d genotypes x %d seeds)",
        planned,
        len(candidates),
        len(r["seeds"]),
    )
    trainable = tune.with_resources(
        tune.with_parameters(retrain_trial, launch=cfg, tracking=tracking, candidates=candidates),
        resources,
    )
    path = _restorable(cfg, "retrain")
    if path:
        log.info("retrain stage: resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        scheduler = None
        if r["asha"]["enabled"]:
            evaluations = math.ceil(r["iterations"] / r["eval_every"])
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=evaluations,
                grace_period=r["asha"]["grace_period"],
                reduction_factor=r["asha"]["reduction_factor"],
            )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "candidate": tune.grid_search(list(range(len(candidates)))),
                "seed": tune.grid_search(list(r["seeds"])),
            },
            tune_config=tune.TuneConfig(
                metric="fid",
                mode="min",
                scheduler=scheduler,
                max_concurrent_trials=cfg["tune"]["max_concurrent"],
            ),
            run_config=_stage_run_config(cfg, "retrain"),
        )
    return result_rows(_fit(tuner))


# Leaderboard


def _device_hours(seconds: float, device: str, resources: dict) -> float:
    """Wall time times the devices held: GPUs (fractions count) on CUDA, else CPUs."""
    share = resources["gpu"] if device.startswith("cuda") else resources["cpu"]
    return seconds / 3600.0 * share


def build_leaderboard(cfg: dict, candidates: list[dict], retrain_rows: list[dict], resources):
    rows = []
    for row in retrain_rows:
        m = row["metrics"]
        if row["failure"] or "fid" not in m:
            continue
        c = candidates[int(row["config"]["candidate"])]
        protocol = json.loads(m["protocol"])
        rows.append(
            {
                "genotype": genotype_from_dict(c["generator"]).hash,
                "candidate": c["label"],
                "seed": int(row["config"]["seed"]),
                "fid": float(m["fid"]),
                "protocol": protocol.get("tag", json.dumps(protocol)),
                "is": float(m.get("is", float("nan"))),
                "kid": float(m.get("kid", float("nan"))),
                "generator_parameters": int(m.get("generator_parameters", 0)),
                "search_device_hours": _device_hours(
                    c["search_device_seconds"], c["search_device"], resources
                ),
                "retrain_device_hours": _device_hours(
                    float(m.get("device_seconds", 0.0)), m.get("device", "cpu"), resources
                ),
                "device": m.get("device", "cpu"),
                "mlflow_run_id": m.get("mlflow_run_id", ""),
            }
        )
    protocols = {row["protocol"] for row in rows}
    if len(protocols) > 1:
        # Numbers measured differently are not comparable; this cannot happen within one launch
        # unless the config changed between resumes.
        raise RuntimeError(f"retrain trials used different FID protocols: {sorted(protocols)}")
    rows.sort(key=lambda row: row["fid"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def format_leaderboard(rows: list[dict]) -> str:
    """The leaderboard as a markdown table."""
    header = "| " + " | ".join(LEADERBOARD_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in LEADERBOARD_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for col in LEADERBOARD_COLUMNS:
            value = row[col]
            if isinstance(value, float):
                value = f"{value:.4g}" if "hours" not in col else f"{value:.4f}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_leaderboard(rows: list[dict], output_dir: str) -> tuple[Path, Path]:
    folder = Path(output_dir)
    csv_path, md_path = folder / "leaderboard.csv", folder / "leaderboard.md"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LEADERBOARD_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(csv_path, text.getvalue())
    _write_atomic(md_path, format_leaderboard(rows))
    return csv_path, md_path


# The launch


def failed_trials(stage: str, rows: list[dict]) -> list[str]:
    return [
        f"{stage} trial (seed {row['config'].get('seed')}): {row['failure']}"
        for row in rows
        if row["failure"]
    ]


def run_launch(cfg: dict, tracker) -> str:
    """Run both stages under the open parent run `tracker`; return the leaderboard as markdown.

    Ray must already be running (runner.launch starts or joins it), and cfg["resources"] must
    already fit the cluster (runner.preflight).
    """
    output_dir = Path(cfg["output_dir"])
    tracking = dict(tracker.handle)
    resources = {"cpu": cfg["resources"]["cpu"], "gpu": cfg["resources"]["gpu"]}
    # Where the report finds this launch's runs.
    keys = ("tracking_uri", "experiment_id", "parent_run_id")
    _write_atomic(output_dir / "launch.json", json.dumps({k: tracking[k] for k in keys}, indent=2))

    log.info("stage 1/2: search")
    search_rows = run_search_stage(cfg, tracking, resources)
    candidates = select_candidates(cfg, search_rows)
    write_candidates(cfg, candidates)
    for path in sorted((output_dir / "genotypes").glob("*.json")):
        tracker.log_artifact(path, "genotypes")
    log.info("hand-off: %d genotypes to retrain", len(candidates))

    log.info("stage 2/2: retrain")
    retrain_rows = run_retrain_stage(cfg, candidates, tracking, resources)
    rows = build_leaderboard(cfg, candidates, retrain_rows, resources)
    csv_path, md_path = write_leaderboard(rows, cfg["output_dir"])
    tracker.log_leaderboard(rows, [csv_path, md_path])
    try:
        tracker.log_artifact(write_report(cfg["output_dir"]))
    except Exception as error:  # the leaderboard stands without its report
        log.warning("could not write the HTML report: %s", error)

    failures = failed_trials("search", search_rows) + failed_trials("retrain", retrain_rows)
    for line in failures:
        log.warning("failed %s", line)
    if failures:
        tracker.set_tags({"failed_trials": str(len(failures))})
    if not rows:
        raise RuntimeError("no retrain trial finished; see the failures above")
    return format_leaderboard(rows)
