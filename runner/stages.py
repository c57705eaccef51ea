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
import re
import sys
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from anas.errors import ConfigError
from anas.genotypes import genotype_from_dict, load_genotype, load_shipped, save_genotype
from runner.cluster import join_storage, launch_storage, read_storage_text
from runner.config import HANDOFF_FILE, genotype_files
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

# A trial that starts in the worker process of a finished trial skips starting a process and
# importing torch, MLflow and the project, about 8 s on a 2-core CPU. Reuse is safe because
# the trial functions seed every random generator they use, set torch's thread count and leave
# nothing in the process that changes the next trial's results.
REUSE_ACTORS = True


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
    failed, reported a failure or a non-finite result counts as the worst FID.

    `save` writes JSON: the sequence of calls made to Optuna and the values reported to it.
    `restore` builds a fresh seeded OptunaSearch and replays that sequence, which brings the study
    and the sampler's random state back to where they were, with no pickled object involved.
    """

    STATE_VERSION = 1

    def __init__(self, space: dict, seeds: list[int], sampler_seed: int, metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.space, self.seeds, self.sampler_seed = dict(space), list(seeds), sampler_seed
        self.inner = self._new_inner()
        self.queue: list[tuple[str, dict, int]] = []
        self.base_of: dict[str, str] = {}  # Tune trial id -> Optuna trial id
        self.scores: dict[str, dict[str, float]] = {}  # Optuna trial id -> Tune trial id -> FID
        self.reported: dict[str, float] = {}  # Optuna trial id -> the mean FID reported to Optuna
        self.calls: list[list] = []  # ["suggest", base, sampled] and ["tell", base, value]
        self.configurations = 0

    def _new_inner(self) -> OptunaSearch:
        return OptunaSearch(
            space=optuna_space(self.space),
            metric=self.metric,
            mode=self.mode,
            sampler=optuna.samplers.TPESampler(seed=self.sampler_seed),
        )

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        super().set_search_properties(metric, mode, config, **spec)
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if not self.queue:
            base = f"configuration_{self.configurations}"
            sampled = self.inner.suggest(base)
            if sampled is None or sampled == Searcher.FINISHED:
                return sampled
            self.calls.append(["suggest", base, sampled])
            self.configurations += 1
            self.queue = [(base, sampled, seed) for seed in self.seeds]
            self.scores[base] = {}
        base, sampled, seed = self.queue.pop(0)
        self.base_of[trial_id] = base
        return {**sampled, "seed": seed}

    def on_trial_complete(self, trial_id, result=None, error=False):
        base = self.base_of.get(trial_id)
        if base is None:
            return
        result = result or {}
        value = result.get(self.metric)
        ok = (
            not error
            and not result.get("failure")
            and isinstance(value, int | float)
            and math.isfinite(value)
        )
        # A trial that errored and is resumed later completes twice; its last result counts.
        self.scores[base][trial_id] = float(value) if ok else WORST_FID
        if len(self.scores[base]) < len(self.seeds):
            return
        mean = sum(self.scores[base].values()) / len(self.seeds)
        if base in self.reported:
            if mean != self.reported[base]:
                log.info(
                    "%s: mean FID is now %.4g, but Optuna keeps the %.4g reported first",
                    base,
                    mean,
                    self.reported[base],
                )
            return
        self.reported[base] = mean
        self.calls.append(["tell", base, mean])
        self.inner.on_trial_complete(base, {self.metric: mean})

    def get_state(self) -> dict:
        return {
            "version": self.STATE_VERSION,
            "space": self.space,
            "seeds": self.seeds,
            "sampler_seed": self.sampler_seed,
            "queue": self.queue,
            "base_of": self.base_of,
            "scores": self.scores,
            "reported": self.reported,
            "calls": self.calls,
            "configurations": self.configurations,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ConfigError(
                f"search: searcher state version {state.get('version')!r} is not "
                f"{self.STATE_VERSION}; start a new launch in another output_dir"
            )
        self.space, self.seeds = state["space"], state["seeds"]
        self.sampler_seed = state["sampler_seed"]
        self.queue = [tuple(entry) for entry in state["queue"]]
        self.base_of, self.scores, self.reported = (
            state["base_of"],
            state["scores"],
            state["reported"],
        )
        self.configurations = state["configurations"]
        self.calls = []
        self.inner = self._new_inner()
        for call in state["calls"]:
            self._replay(call)

    def _replay(self, call: list) -> None:
        kind, base, value = call
        if kind == "tell":
            self.inner.on_trial_complete(base, {self.metric: value})
        else:
            sampled = self.inner.suggest(base)
            if sampled != value:
                # NOTE: a different Optuna version or sampler can draw differently; the trials
                # already queued keep the configurations they were given.
                log.warning("%s: Optuna drew %s on replay, %s before", base, sampled, value)
        self.calls.append(call)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()), encoding="utf-8")

    def restore(self, checkpoint_path: str) -> None:
        path = Path(checkpoint_path)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(
                f"{path}: cannot read the search stage's searcher state ({error}); start a new "
                "launch in another output_dir"
            ) from None
        self.set_state(state)
        log.info("search stage: restored Optuna from %d recorded calls", len(self.calls))


# Stages


class StopOnInvalidInput(Stopper):
    """Stops the whole stage once a trial reports `invalid_input`: other trials would meet it too.

    A trial reports it when it meets bad input that only a trial can see (a corrupt checkpoint
    on resume, say), instead of raising, so Tune does not retry what cannot succeed.
    """

    def __init__(self):
        self.invalid = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("invalid_input"):
            self.invalid = True
        return self.invalid

    def stop_all(self) -> bool:
        return self.invalid


def _stage_run_config(cfg: dict, name: str) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=launch_storage(cfg),
        failure_config=tune.FailureConfig(max_failures=cfg["tune"]["max_failures"]),
        # Tune saves its experiment state, which a resumed stage restores, at least after every
        # num_to_keep-th checkpoint of a trial (ray/tune/execution/experiment_state.py, Ray
        # 2.60), so an interrupted trial continues from its last or second-to-last checkpoint.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        stop=StopOnInvalidInput(),
        verbose=1,
    )


def _fit(tuner: tune.Tuner):
    # Ray Tune prints its trial table to stdout; stdout is for results, so move it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        return tuner.fit()


def _restore(cfg: dict, name: str, trainable) -> tune.Tuner | None:
    """Restore the stage's Tuner from its folder when resuming and Tune saved its state there.

    Finished trials keep their results, trials that were running continue from their last
    checkpoint, and errored trials resume from theirs (Tune's resume_errored).

    NOTE: Tune unpickles tuner.pkl and its experiment state from the stage folder, so resume
    only launches whose output_dir you trust. The trial checkpoints contain tensors only.
    """
    path = join_storage(launch_storage(cfg), name)
    if not (cfg["resume"] and tune.Tuner.can_restore(path)):
        return None
    log.info("%s stage: resuming %s", name, path)
    return tune.Tuner.restore(
        path, trainable, resume_unfinished=True, resume_errored=True, restart_errored=False
    )


def result_rows(grid) -> list[dict]:
    """One row per trial: its config, last reported metrics and why it has no result, if so.

    Raises ConfigError with the first trial's `invalid_input` message: bad input that the trial
    met (see StopOnInvalidInput).
    """
    rows = []
    for result in grid:
        m = dict(result.metrics or {})
        if m.get("invalid_input"):
            raise ConfigError(m["invalid_input"])
        failure = m.get("failure") or (_error_summary(result.error) if result.error else None)
        if not failure and not m.get("completed"):
            failure = "stopped before its last iteration (early stopping)"
        rows.append(
            {
                "config": result.config or {},
                "metrics": m,
                "failure": failure,
                "name": Path(result.path).name if result.path else "",
                "errors": trial_errors(result.path, result.filesystem),
            }
        )
    return rows


def _error_summary(error: BaseException | str) -> str:
    """The line of a trial's error that names the exception, without Ray's traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    if named:
        return named[-1]
    return lines[0]


def trial_errors(trial_path: str | None, filesystem=None) -> list[str]:
    """Summaries of every failure Tune recorded in the trial folder's error.txt, oldest first.

    Tune appends one block per failure, retried or not, and keeps the file across resumes.
    `filesystem` is the Tune result's pyarrow filesystem, for storage given as a URI.
    """
    if not trial_path:
        return []
    text = read_storage_text(f"{trial_path}/error.txt", filesystem)
    if text is None:
        return []
    blocks = re.split(r"^Failure # \d+ \(occurred at [^)]*\)\n", text, flags=re.M)
    return [_error_summary(block) for block in blocks if block.strip()]


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
    tuner = _restore(cfg, "search", trainable)
    if tuner is None:
        # The sampler's seed is the first search seed, so a launch repeats its configurations.
        searcher = SeededSearch(s["space"], s["seeds"], s["seeds"][0], "fid", "min")
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                num_samples=planned,
                max_concurrent_trials=cfg["tune"]["max_concurrent"],
                reuse_actors=REUSE_ACTORS,
            ),
            run_config=_stage_run_config(cfg, "search"),
        )
    return result_rows(_fit(tuner))


def select_candidates(cfg: dict, search_rows: list[dict]) -> list[dict]:
    """Return the best distinct searched genotypes, then baselines and genotype files."""
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
    if not searched and not (r["genotypes"] or r["baselines"]):
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
    out = []
    for file in genotype_files(path):
        g = load_genotype(file)
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
    tuner = _restore(cfg, "retrain", trainable)
    if tuner is None:
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
                reuse_actors=REUSE_ACTORS,
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
    """Format the leaderboard as a markdown table."""
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


HANDOFF_VERSION = 1
MAX_TAG_LENGTH = 5000  # MLflow accepts tag values up to 8000 characters


def trial_failures(stage: str, rows: list[dict]) -> tuple[list[str], list[str]]:
    """Lines naming the trials that failed, and those that failed and recovered, with why."""
    failed, recovered = [], []
    for row in rows:
        who = f"{stage} trial {row['name']} (seed {row['config'].get('seed')})"
        errors = row.get("errors", [])
        if row["failure"]:
            failed.append(f"{who}: {row['failure']}")
        elif errors:
            recovered.append(f"{who} recovered after {len(errors)} failures; last: {errors[-1]}")
    return failed, recovered


def write_handoff(output_dir: Path, candidates: list[dict], failed: list, recovered: list):
    """Save the hand-off, so that a resumed launch goes straight to the retrain stage."""
    handoff = {
        "version": HANDOFF_VERSION,
        "candidates": candidates,
        "search_failed": failed,
        "search_recovered": recovered,
    }
    _write_atomic(output_dir / HANDOFF_FILE, json.dumps(handoff, indent=2))


def read_handoff(output_dir: Path) -> dict | None:
    """The hand-off of an earlier run of this launch, or None if its search stage did not end."""
    path = output_dir / HANDOFF_FILE
    if not path.is_file():
        return None
    try:
        handoff = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path}: cannot read the hand-off ({error}); delete it to run the search stage again"
        ) from None
    if not isinstance(handoff, dict) or handoff.get("version") != HANDOFF_VERSION:
        raise ConfigError(
            f"{path}: not a hand-off of version {HANDOFF_VERSION}; delete it to run the search "
            "stage again"
        )
    for index, candidate in enumerate(handoff["candidates"]):
        where = f"{path} candidates[{index}]"
        genotype_from_dict(candidate["generator"], where)
        if candidate["discriminator"]:
            genotype_from_dict(candidate["discriminator"], where)
    return handoff


def report_failures(tracker, failed: list[str], recovered: list[str]) -> None:
    """Log the trials that failed or recovered, and tag the parent run with them."""
    for line in failed:
        log.warning("failed %s", line)
    for line in recovered:
        log.warning("retried %s", line)
    tags = {"failed_trials": str(len(failed)), "retried_trials": str(len(recovered))}
    if failed or recovered:
        text = "\n".join(failed + recovered)
        if len(text) > MAX_TAG_LENGTH:
            text = text[: MAX_TAG_LENGTH - 20] + "\n... (cut; see the log)"
        tags["trial_failures"] = text
    tracker.set_tags(tags)


def run_launch(cfg: dict, tracker) -> str:
    """Run both stages under the open parent run `tracker`; return the leaderboard as markdown.

    Ray must already be running (runner.launch starts or joins it), and cfg["resources"] must
    already fit the cluster (runner.preflight). A resumed launch whose search stage ended reads
    output_dir/handoff.json and goes straight to the retrain stage.
    """
    output_dir = Path(cfg["output_dir"])
    tracking = dict(tracker.handle)
    resources = {"cpu": cfg["resources"]["cpu"], "gpu": cfg["resources"]["gpu"]}

    handoff = read_handoff(output_dir) if cfg["resume"] else None
    if handoff is None:
        log.info("stage 1/2: search")
        search_rows = run_search_stage(cfg, tracking, resources)
        candidates = select_candidates(cfg, search_rows)
        write_candidates(cfg, candidates)
        for path in sorted((output_dir / "genotypes").glob("*.json")):
            tracker.log_artifact(path, "genotypes")
        search_failed, search_recovered = trial_failures("search", search_rows)
        write_handoff(output_dir, candidates, search_failed, search_recovered)
    else:
        log.info("stage 1/2: search ended before; reading %s", output_dir / HANDOFF_FILE)
        candidates = handoff["candidates"]
        search_failed, search_recovered = handoff["search_failed"], handoff["search_recovered"]
    log.info("hand-off: %d genotypes to retrain", len(candidates))

    log.info("stage 2/2: retrain")
    retrain_rows = run_retrain_stage(cfg, candidates, tracking, resources)
    rows = build_leaderboard(cfg, candidates, retrain_rows, resources)
    csv_path, md_path = write_leaderboard(rows, cfg["output_dir"])
    tracker.log_leaderboard(rows, [csv_path, md_path])
    try:
        tracker.log_artifact(write_report(cfg["output_dir"]))
    except Exception as error:  # the leaderboard is complete without its report
        log.warning("could not write the HTML report: %s", error)

    retrain_failed, retrain_recovered = trial_failures("retrain", retrain_rows)
    report_failures(tracker, search_failed + retrain_failed, search_recovered + retrain_recovered)
    if not rows:
        raise RuntimeError("no retrain trial finished; see the failures above")
    return format_leaderboard(rows)
