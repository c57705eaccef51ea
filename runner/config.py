"""Compose a launch config with Hydra and validate it against a typed schema.

`compose(overrides)` is the one way in, shared by the launcher and the tests. It composes
experiments/config.yaml with one `exp` file and one `budget` file, checks every key, type and
value against the dataclasses below, makes every path absolute and returns a plain dict. Any
problem raises ConfigError naming the key, before anything starts.

The dataclasses hold no defaults because experiments/ is the single table of values: a key
missing there is an error, never a silent fallback to a value written in code.
"""

import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from anas.data import validate_data
from anas.errors import ConfigError
from anas.extractors import EXTRACTORS
from anas.genotypes import SHIPPED, load_genotype
from anas.losses import LOSSES
from anas.metrics import MetricSettings
from experiments import CONFIG_DIR
from runner.cluster import AUTH_MODES, check_storage_path

CONFIG_NAME = "config"

# Values of `retrain.discriminator` besides a genotype: the searched one or AutoGAN's fixed one.
DISCRIMINATORS = ("searched", "autogan")
# Types of a `search.space` range and the keys each needs. int bounds are inclusive.
SPACE_KEYS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high"),
    "choice": ("values",),
}


# ---------------------------------------------------------------------------------------------
# Value checks. Each field names in `expected` the type and the values it accepts. That phrase
# follows the key in the error message, for a wrong type and a wrong value alike.


def _spec(expected: str, check: Callable[[Any], bool] | None = None, *, path: bool = False):
    """Declare a schema field: `check` tests a value of the right type, `path` makes it absolute."""
    return field(metadata={"expected": expected, "check": check, "path": path})


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def _at_least(minimum: float) -> Callable[[Any], bool]:
    return lambda value: math.isfinite(value) and value >= minimum


def _unit_interval(value) -> bool:
    return 0.0 <= value < 1.0


def _betas(value) -> bool:
    return len(value) == 2 and all(_unit_interval(beta) for beta in value)


def _seeds(value) -> bool:
    return len(value) > 0 and len(set(value)) == len(value) and all(seed >= 0 for seed in value)


def _image_size(value) -> bool:
    return value >= 16 and value % 8 == 0


def _non_empty(value) -> bool:
    return len(value) > 0


def _name(value) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) is not None


POSITIVE_FLOAT = "a positive float"
POSITIVE_INT = "a positive integer"
SEEDS = "a non-empty list of distinct integers >= 0"
BETAS = "a list of two floats in [0, 1)"
BOOL = "true or false"


# ---------------------------------------------------------------------------------------------
# The schema: one dataclass per section of experiments/config.yaml.


@dataclass
class DataSchema:
    name: str = _spec("a dataset name", _non_empty)
    root: str | None = _spec("a file or folder path, or null", _non_empty, path=True)
    img_size: int = _spec("a multiple of 8 that is at least 16", _image_size)
    channels: int = _spec("1 or 3", lambda value: value in (1, 3))
    split: str = _spec("a split name", _non_empty)


@dataclass
class ModelSchema:
    latent_dim: int = _spec(POSITIVE_INT, _positive)
    g_channels: int = _spec(POSITIVE_INT, _positive)
    d_channels: int = _spec(POSITIVE_INT, _positive)


@dataclass
class SearchSchema:
    seeds: list[int] = _spec(SEEDS, _seeds)
    num_samples: int = _spec(POSITIVE_INT, _positive)
    iterations: int = _spec(POSITIVE_INT, _positive)
    batch_size: int = _spec(POSITIVE_INT, _positive)
    n_critic: int = _spec(POSITIVE_INT, _positive)
    loss: str = _spec("a loss name", _non_empty)
    arch_lr: float = _spec(POSITIVE_FLOAT, _positive)
    arch_betas: list[float] = _spec(BETAS, _betas)
    arch_weight_decay: float = _spec("a float >= 0", _at_least(0))
    g_lr: float = _spec(POSITIVE_FLOAT, _positive)
    d_lr: float = _spec(POSITIVE_FLOAT, _positive)
    betas: list[float] = _spec(BETAS, _betas)
    gumbel: bool = _spec(BOOL)
    tau_max: float = _spec(POSITIVE_FLOAT, _positive)
    tau_min: float = _spec(POSITIVE_FLOAT, _positive)
    eval_every: int = _spec(POSITIVE_INT, _positive)
    space: dict[str, Any] = _spec("a mapping from search keys to sampling ranges")


@dataclass
class AshaSchema:
    enabled: bool = _spec(BOOL)
    grace_period: int = _spec(POSITIVE_INT, _positive)
    reduction_factor: float = _spec("a float > 1", lambda value: value > 1)


@dataclass
class RetrainSchema:
    top_k: int = _spec(POSITIVE_INT, _positive)
    seeds: list[int] = _spec(SEEDS, _seeds)
    baselines: list[str] = _spec("a list of shipped genotype names")
    genotypes: list[str] = _spec("a list of genotype files or launch folders", path=True)
    discriminator: str = _spec(" or ".join(DISCRIMINATORS), lambda value: value in DISCRIMINATORS)
    g_channels: int = _spec(POSITIVE_INT, _positive)
    d_channels: int = _spec(POSITIVE_INT, _positive)
    iterations: int = _spec(POSITIVE_INT, _positive)
    batch_size: int = _spec(POSITIVE_INT, _positive)
    gen_batch_size: int = _spec(POSITIVE_INT, _positive)
    n_critic: int = _spec(POSITIVE_INT, _positive)
    loss: str = _spec("a loss name", _non_empty)
    g_lr: float = _spec(POSITIVE_FLOAT, _positive)
    d_lr: float = _spec(POSITIVE_FLOAT, _positive)
    betas: list[float] = _spec(BETAS, _betas)
    lr_decay: bool = _spec(BOOL)
    ema_decay: float = _spec("a float in [0, 1)", _unit_interval)
    eval_every: int = _spec(POSITIVE_INT, _positive)
    asha: AshaSchema = _spec("a mapping")


@dataclass
class MetricsSchema:
    extractor: str = _spec("a feature-extractor name", _non_empty)
    n_generated: int = _spec(POSITIVE_INT, _positive)
    n_real: int | None = _spec(
        "a positive integer, or null for the whole reference split", _positive
    )
    inception_weights: str | None = _spec("a file path or null", _non_empty, path=True)
    search_n_generated: int = _spec(POSITIVE_INT, _positive)


@dataclass
class ResourcesSchema:
    cpu: float = _spec("a positive float (CPUs per trial)", _positive)
    gpu: float = _spec("a float >= 0 (GPUs per trial, fractions allowed)", _at_least(0))
    cpu_fallback: bool = _spec(BOOL)


@dataclass
class TuneSchema:
    max_failures: int = _spec("an integer >= -1", _at_least(-1))
    max_concurrent: int | None = _spec("a positive integer or null", _positive)
    checkpoint_interval_s: float = _spec("a float >= 0 (seconds)", _at_least(0))


@dataclass
class RaySchema:
    address: str | None = _spec("an address string or null", _non_empty)
    auth_mode: str = _spec(" or ".join(AUTH_MODES), lambda value: value in AUTH_MODES)
    token_file: str | None = _spec("a file path or null", _non_empty, path=True)
    ship_code: bool = _spec(BOOL)


@dataclass
class StorageSchema:
    path: str | None = _spec("a directory path, a URI or null", _non_empty, path=True)


@dataclass
class MlflowSchema:
    tracking_uri: str | None = _spec("a tracking URI or null", _non_empty)
    experiment: str = _spec("a non-empty experiment name", _non_empty)
    primary_metric: str = _spec("a metric name", _name)
    request_timeout_s: float = _spec(POSITIVE_FLOAT, _positive)
    max_retries: int = _spec("an integer >= 0", _at_least(0))


@dataclass
class LaunchSchema:
    exp_name: str = _spec("a name of letters, digits, '.', '_' and '-'", _name)
    budget_name: str = _spec("a name of letters, digits, '.', '_' and '-'", _name)
    output_root: str = _spec("a directory path", _non_empty, path=True)
    output_dir: str = _spec("a directory path", _non_empty, path=True)
    cache_dir: str = _spec("a directory path", _non_empty, path=True)
    resume: bool = _spec(BOOL)
    data: DataSchema = _spec("a mapping")
    model: ModelSchema = _spec("a mapping")
    search: SearchSchema = _spec("a mapping")
    retrain: RetrainSchema = _spec("a mapping")
    metrics: MetricsSchema = _spec("a mapping")
    resources: ResourcesSchema = _spec("a mapping")
    tune: TuneSchema = _spec("a mapping")
    ray: RaySchema = _spec("a mapping")
    storage: StorageSchema = _spec("a mapping")
    mlflow: MlflowSchema = _spec("a mapping")


# ---------------------------------------------------------------------------------------------
# Composition.


def compose(overrides: Sequence[str] = (), base_dir: str | Path | None = None) -> dict:
    """Compose, validate and resolve the launch config; return it as a plain dict.

    `overrides` are Hydra command-line overrides such as `exp=cifar10` or `search.g_lr=1e-4`.
    Relative paths are resolved against `base_dir` (the current directory when None). A null
    `storage.path` becomes output_dir. Raises ConfigError naming the key on any problem,
    including an output_dir that cannot be written or that contains an earlier launch while
    `resume` is false.
    """
    raw = _compose_raw(list(overrides))
    cfg = validate(raw, base_dir)
    _check_output_dir(cfg)
    return cfg


def _compose_raw(overrides: list[str]) -> dict:
    if not OmegaConf.has_resolver("now"):
        # Hydra registers `now` when it runs an app (hydra.core.utils.setup_globals), not for
        # the compose API. Caching keeps every ${now:...} of one composed config at one instant.
        OmegaConf.register_new_resolver(
            "now", lambda pattern: datetime.now().strftime(pattern), use_cache=True
        )
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="anas"):
            composed = hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
        return OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    except MissingConfigException as error:
        raise _missing_config_error(error) from None
    except OverrideParseException as error:
        raise _override_error(error) from None
    except HydraException as error:
        raise _hydra_error(error) from None
    except OmegaConfBaseException as error:
        raise _omegaconf_error(error) from None


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def _override_error(error: OverrideParseException) -> ConfigError:
    lines = [line for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 else _first_line(error)
    return ConfigError(f"invalid override {error.override!r}: {reason}; expected KEY=VALUE")


def _missing_config_error(error: MissingConfigException) -> ConfigError:
    group, _, name = (error.missing_cfg_file or "").partition("/")
    if name and error.options:
        return ConfigError(
            f"{group}: no config named {name!r} in experiments/{group}/; "
            f"expected one of {', '.join(sorted(error.options))}"
        )
    return ConfigError(_first_line(error))


def _hydra_error(error: HydraException) -> ConfigError:
    match = re.match(r"Could not override '([^']+)'", str(error))
    if not match:
        return ConfigError(" ".join(str(error).split()))
    # The cause names the innermost key, e.g. `low` inside a search.space entry of another type.
    key = getattr(error.__cause__, "full_key", None) or match.group(1)
    message = f"{key}: unknown key; the keys are in experiments/config.yaml"
    if key.startswith("search.space."):
        name = key.split(".")[2]
        message += (
            f". A range of another type replaces the old one with "
            f"~search.space.{name} +search.space.{name}={{...}}"
        )
    return ConfigError(message)


def _omegaconf_error(error: OmegaConfBaseException) -> ConfigError:
    key = getattr(error, "full_key", None)
    message = _first_line(getattr(error, "msg", None) or error)
    if isinstance(error, MissingMandatoryValue) and key:
        return ConfigError(
            f"{key}: missing value; set it in the experiment or budget file or as {key}=..."
        )
    return ConfigError(f"{key}: {message}" if key else message)


# ---------------------------------------------------------------------------------------------
# Validation of a plain dict (a composed config or a saved config.yaml).


def validate(raw: dict, base_dir: str | Path | None = None) -> dict:
    """Check `raw` against LaunchSchema; return a copy with absolute paths, ints widened to float.

    Checks types and values of every key, rejects unknown and missing keys, then the rules
    that join several keys (temperatures, sampling ranges, registry names, genotype files).
    """
    cfg = _validate_section(LaunchSchema, raw, "")
    _resolve_paths(LaunchSchema, cfg, Path(base_dir or os.getcwd()))
    if cfg["storage"]["path"] is None:
        cfg["storage"]["path"] = cfg["output_dir"]
    check_storage_path(cfg["storage"]["path"])
    if cfg["mlflow"]["tracking_uri"] is not None:
        cfg["mlflow"]["tracking_uri"] = absolute_tracking_uri(
            cfg["mlflow"]["tracking_uri"], Path(base_dir or os.getcwd())
        )
    _check_search(cfg["search"])
    _check_registry_names(cfg)
    _check_sample_counts(cfg["metrics"])
    _check_retrain(cfg)
    _check_genotype_files(cfg["retrain"]["genotypes"])
    _check_inception_weights(cfg["metrics"]["inception_weights"])
    return cfg


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    """Format a config value as YAML would write it, so messages match what users typed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
        return repr(value)
    return str(value)


def _validate_section(schema: type, value: Any, key: str) -> dict:
    names = [spec.name for spec in fields(schema)]
    if not isinstance(value, dict):
        where = key or "the config"
        raise ConfigError(
            f"{where}: expected a mapping with keys {', '.join(names)}, got {_show(value)}"
        )
    unknown = sorted(set(value) - set(names))
    if unknown:
        section = f" of {key}" if key else ""
        raise ConfigError(
            f"{_join(key, str(unknown[0]))}: unknown key; the keys{section} are {', '.join(names)}"
        )
    hints = typing.get_type_hints(schema)
    result = {}
    for spec in fields(schema):
        full_key = _join(key, spec.name)
        if spec.name not in value:
            raise ConfigError(f"{full_key}: missing; set it in experiments/ or as +{full_key}=...")
        annotation = hints[spec.name]
        if is_dataclass(annotation):
            result[spec.name] = _validate_section(annotation, value[spec.name], full_key)
            continue
        ok, normalised = _match_type(value[spec.name], annotation)
        check = spec.metadata["check"]
        if ok and check is not None and normalised is not None:
            ok = _passes(check, normalised)
        if not ok:
            raise ConfigError(
                f"{full_key}: expected {spec.metadata['expected']}, got {_show(value[spec.name])}"
            )
        result[spec.name] = normalised
    return result


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(check(value))
    except (TypeError, ValueError):
        return False


def _match_type(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Return whether `value` has the annotated type, and the value with ints widened to float."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return is_number, float(value) if is_number else value
    if annotation is str:
        return isinstance(value, str), value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None:
                    return True, None
                continue
            ok, normalised = _match_type(value, option)
            if ok:
                return True, normalised
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_type,) = typing.get_args(annotation)
        items = []
        for item in value:
            ok, normalised = _match_type(item, item_type)
            if not ok:
                return False, value
            items.append(normalised)
        return True, items
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value), value
    raise TypeError(f"schema annotation {annotation!r} is not supported")


def absolute_tracking_uri(uri: str, base_dir: Path) -> str:
    """Make a relative SQLite or local-folder tracking URI absolute; leave server URIs alone.

    Ray Tune starts trials in their own working directories, so a relative store would open a
    different database in every trial.
    """
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path == ":memory:" or Path(path).is_absolute():
            return uri
        return "sqlite:///" + os.path.abspath(base_dir / path)
    if uri.startswith("file:") or "://" in uri:
        return uri
    return os.path.abspath(base_dir / Path(uri).expanduser())


def _absolute(value: str, base_dir: Path) -> str:
    if "://" in value:  # a URI (s3://, gs://, file://) is not a local path
        return value
    return os.path.abspath(base_dir / Path(value).expanduser())


def _resolve_paths(schema: type, section: dict, base_dir: Path) -> None:
    hints = typing.get_type_hints(schema)
    for spec in fields(schema):
        value = section[spec.name]
        if is_dataclass(hints[spec.name]):
            _resolve_paths(hints[spec.name], value, base_dir)
        elif spec.metadata["path"] and isinstance(value, list):
            section[spec.name] = [_absolute(item, base_dir) for item in value]
        elif spec.metadata["path"] and value is not None:
            section[spec.name] = _absolute(value, base_dir)


# ---------------------------------------------------------------------------------------------
# Rules that join several keys.


def _check_search(search: dict) -> None:
    if search["tau_min"] > search["tau_max"]:
        raise ConfigError(
            f"search.tau_min: expected a float no larger than search.tau_max "
            f"({_show(search['tau_max'])}), got {_show(search['tau_min'])}"
        )
    for name, entry in search["space"].items():
        _check_space_entry(name, entry)


def _check_space_entry(name: str, entry: Any) -> None:
    """Check one sampling range of `search.space` against the schema of the key it samples."""
    key = f"search.space.{name}"
    specs = {spec.name: spec for spec in fields(SearchSchema)}
    hints = typing.get_type_hints(SearchSchema)
    sampleable = [n for n in specs if hints[n] in (int, float) and n != "num_samples"]
    if name not in sampleable:
        raise ConfigError(f"{key}: unknown search key; ranges can sample {', '.join(sampleable)}")

    # The shape of the entry: a known type and exactly the keys that type needs.
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}: expected a mapping with `type`, got {_show(entry)}")
    kind = entry.get("type")
    if kind not in SPACE_KEYS:
        raise ConfigError(f"{key}.type: expected one of {', '.join(SPACE_KEYS)}, got {_show(kind)}")
    unknown = sorted(set(entry) - set(SPACE_KEYS[kind]) - {"type"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key for type {kind}")
    for needed in SPACE_KEYS[kind]:
        if needed not in entry:
            raise ConfigError(
                f"{key}.{needed}: missing; type {kind} needs {' and '.join(SPACE_KEYS[kind])}"
            )
    annotation = hints[name]
    if annotation is int and kind in ("uniform", "loguniform"):
        raise ConfigError(f"{key}.type: search.{name} is an integer; use int or choice, got {kind}")

    # Every value the range can produce must pass the check of search.<name>. The checks are
    # monotone (lower bounds), so testing both ends covers a whole interval.
    if kind == "choice":
        if not isinstance(entry["values"], list) or not entry["values"]:
            raise ConfigError(
                f"{key}.values: expected a non-empty list, got {_show(entry['values'])}"
            )
        points = [(f"{key}.values", value) for value in entry["values"]]
    else:
        points = [(f"{key}.low", entry["low"]), (f"{key}.high", entry["high"])]
    value_type = int if kind == "int" else annotation
    spec = specs[name]
    for point_key, value in points:
        type_ok, normalised = _match_type(value, value_type)
        if not type_ok and value_type is int:
            raise ConfigError(f"{point_key}: expected an integer, got {_show(value)}")
        if not type_ok or not _passes(spec.metadata["check"], normalised):
            raise ConfigError(
                f"{point_key}: expected {spec.metadata['expected']}, got {_show(value)}"
            )
    if kind != "choice" and not entry["low"] < entry["high"]:
        raise ConfigError(
            f"{key}.high: expected a value above low ({_show(entry['low'])}), "
            f"got {_show(entry['high'])}"
        )


def _check_registry_names(cfg: dict) -> None:
    """Look up every name that a registry of anas/ must contain, and the dataset's split."""
    spec = validate_data(cfg["data"])
    if cfg["data"]["split"] not in spec.splits:
        raise ConfigError(
            f"data.split: dataset {cfg['data']['name']!r} has no split {cfg['data']['split']!r}; "
            f"expected one of {', '.join(spec.splits)}"
        )
    LOSSES.get(cfg["search"]["loss"], key="search.loss")
    LOSSES.get(cfg["retrain"]["loss"], key="retrain.loss")
    EXTRACTORS.get(cfg["metrics"]["extractor"], key="metrics.extractor")
    for index, name in enumerate(cfg["retrain"]["baselines"]):
        if name not in SHIPPED:
            raise ConfigError(
                f"retrain.baselines[{index}]: unknown shipped genotype {name!r}; "
                f"expected one of {', '.join(sorted(SHIPPED))}"
            )


def _check_sample_counts(metrics: dict) -> None:
    """Require the sample counts that KID needs: it averages over subsets of a fixed size."""
    size = MetricSettings().kid_subset_size
    for key in ("n_generated", "n_real"):
        if metrics[key] is not None and metrics[key] < size:
            raise ConfigError(
                f"metrics.{key}: expected at least {size} (the KID subset size), got {metrics[key]}"
            )
    if metrics["search_n_generated"] < 2:
        raise ConfigError(
            "metrics.search_n_generated: expected at least 2 (FID needs two samples), "
            f"got {metrics['search_n_generated']}"
        )


def genotype_files(path: str | Path, key: str = "retrain.genotypes") -> list[Path]:
    """The generator genotype files that one `retrain.genotypes` entry names.

    An entry is a generator JSON file, a folder of `*generator.json` files, or the output_dir of
    an earlier launch (its genotypes/ folder). Raises ConfigError naming `key`.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "genotypes" if (path / "genotypes").is_dir() else path
        files = sorted(folder.glob("*generator.json"))
        if not files:
            raise ConfigError(f"{key}: no *generator.json files in {folder}")
        return files
    if path.is_file():
        return [path]
    raise ConfigError(
        f"{key}: {path} not found; give a generator genotype JSON file or the output_dir of an "
        "earlier launch"
    )


def _check_genotype_files(paths: list[str]) -> None:
    for index, path in enumerate(paths):
        genotype_files(path, f"retrain.genotypes[{index}]")


def check_genotype_files(cfg: dict) -> None:
    """Read every genotype that `retrain.genotypes` names, so a bad one fails before training.

    Separate from `validate`, which only checks that the files exist: reading them is the
    launcher's pre-flight.
    """
    for index, path in enumerate(cfg["retrain"]["genotypes"]):
        key = f"retrain.genotypes[{index}]"
        for file in genotype_files(path, key):
            partner = file.with_name(file.name.replace("generator.json", "discriminator.json"))
            try:
                genotype = load_genotype(file)
                if partner != file and partner.is_file():
                    load_genotype(partner)
            except ConfigError as error:
                raise ConfigError(f"{key}: {error}") from None
            if genotype.network != "generator":
                raise ConfigError(
                    f"{key}: {file} contains a {genotype.network}, expected a generator"
                )


def _check_retrain(cfg: dict) -> None:
    """Reject a top_k that the search stage cannot reach: it yields one genotype per trial."""
    search, top_k = cfg["search"], cfg["retrain"]["top_k"]
    trials = len(search["seeds"]) * search["num_samples"]
    if top_k > trials:
        raise ConfigError(
            f"retrain.top_k: {top_k} is larger than the {trials} search trials "
            f"(search.seeds x search.num_samples), which find at most {trials} distinct "
            "genotypes; lower retrain.top_k or add search.seeds"
        )


def _check_inception_weights(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"metrics.inception_weights: file not found: {path}")


def _check_output_dir(cfg: dict) -> None:
    """Reject an output_dir that cannot be created or written, or that contains another launch."""
    output_dir = Path(cfg["output_dir"])
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} exists and is not a directory")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir: cannot create {output_dir} because {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {existing} is not writable; choose another output_dir")
    if (output_dir / "config.yaml").exists() and not cfg["resume"]:
        raise ConfigError(
            f"output_dir: {output_dir} already contains a launch (config.yaml); set "
            "resume=true to continue it or choose another output_dir"
        )


# ---------------------------------------------------------------------------------------------
# Resuming.

# Keys that a resumed launch may override. They change where and how it runs, never what it
# computes; every other key keeps the value saved in output_dir/config.yaml. Thread counts and
# devices come from `resources`, which is therefore not among them.
RESUME_KEYS = (
    "resume",
    "output_dir",
    "ray.address",
    "tune.max_failures",
    "tune.max_concurrent",
    "tune.checkpoint_interval_s",
    "mlflow.request_timeout_s",
    "mlflow.max_retries",
)
# Config groups: an override of one is compared through the name its file sets.
GROUP_NAMES = {"exp": "exp_name", "budget": "budget_name"}
# The hand-off of the search stage in output_dir. Until it exists, retrain.top_k has not been
# used, so a resumed launch may change it (after a top_k the search could not meet, say).
HANDOFF_FILE = "handoff.json"


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys or groups that Hydra command-line overrides set, add or delete."""
    keys = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].strip()
        if not key.startswith("hydra."):
            keys.append(key)
    return keys


def _lookup(cfg: dict, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


_ABSENT = object()


def resumed_config(composed: dict, overrides: Sequence[str]) -> dict:
    """Return the saved config of the launch in composed["output_dir"], to be continued.

    `composed` is composed from `overrides`. Overrides of RESUME_KEYS, and of retrain.top_k
    before the hand-off, apply; any other override must repeat the saved value. Raises
    ConfigError naming the first key that would change the experiment.
    """
    path = Path(composed["output_dir"]) / "config.yaml"
    cfg = load_config(path, defaults=composed)
    keys = override_keys(overrides)
    before_handoff = not (path.parent / HANDOFF_FILE).exists()
    allowed = [*RESUME_KEYS, "retrain.top_k"] if before_handoff else list(RESUME_KEYS)
    for key in keys:
        if key in allowed:
            continue
        name = GROUP_NAMES.get(key, key)
        old, new = _lookup(cfg, name), _lookup(composed, name)
        if old != new:
            shown_old = "absent" if old is _ABSENT else _show(old)
            shown_new = "absent" if new is _ABSENT else _show(new)
            raise ConfigError(
                f"{key}: a resumed launch keeps the value in {path} ({shown_old}), got "
                f"{shown_new}; drop the override or start a new launch in another output_dir"
            )
    if cfg["storage"]["path"] == cfg["output_dir"]:
        cfg["storage"]["path"] = composed["output_dir"]  # the launch folder may have been moved
    for key in {"resume", "output_dir", *keys} & set(allowed):
        *parents, name = key.split(".")
        section, source = cfg, composed
        for part in parents:
            section, source = section[part], source[part]
        section[name] = source[name]
    return cfg


# ---------------------------------------------------------------------------------------------
# Saving and loading.


def save_config(cfg: dict, path: str | Path) -> None:
    """Write `cfg` as YAML atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            yaml.safe_dump(cfg, stream, sort_keys=False, default_flow_style=None)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_config(path: str | Path, defaults: Mapping[str, Any] | None = None) -> dict:
    """Read and validate a config.yaml written by `save_config` (its paths are absolute).

    With `defaults` (a composed config), RESUME_KEYS that the file lacks take their values
    from it, so a launch saved before such a key existed can still be resumed.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {_first_line(error)}") from None
    if defaults is not None and isinstance(raw, dict):
        for key in RESUME_KEYS:
            *parents, name = key.split(".")
            section, source = raw, defaults
            for part in parents:
                section, source = section.get(part), source[part]
                if not isinstance(section, dict):
                    break
            else:
                section.setdefault(name, source[name])
    try:
        return validate(raw, path.parent)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
