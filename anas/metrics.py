"""IS, FID and KID of generated images, computed in memory with torch-fidelity's metric code.

`Evaluator` compares samples drawn from a function against the real images of one dataset
split. The real side is reduced once to reference statistics: the FID mean and covariance,
plus the features that KID draws subsets from. These are cached on disk under a key of the
whole protocol. Every later evaluation with the same protocol then extracts features of the
generated images only.

Every result carries its `Protocol`, whose `tag` names the extractor, dataset, split, sample
counts and image size, e.g. `classifier-digits-train-r1437-g1000-16px`.
"""

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from tqdm import tqdm

from anas.cache import atomic_write, cache_key, locked
from anas.data import ImageSet, load_images, to_uint8, validate_data
from anas.errors import ConfigError
from anas.extractors import EXTRACTORS, ExtractorWeights, default_feature_layer

log = logging.getLogger(__name__)

METRICS = ("fid", "is", "kid")
# torch-fidelity's names for the feature layer of each metric
FIDELITY_METRIC = {"fid": "fid", "is": "isc", "kid": "kid"}

# Seed of the permutation that picks n_real images when n_real is smaller than the split.
REAL_SUBSET_SEED = 0


@dataclass(frozen=True)
class Protocol:
    """The measurement settings behind a metric value; values compare only if these match."""

    extractor: str  # an entry of anas.extractors.EXTRACTORS
    dataset: str
    split: str  # the real split behind the reference statistics
    img_size: int
    n_generated: int
    n_real: int

    @property
    def tag(self) -> str:
        return (
            f"{self.extractor}-{self.dataset}-{self.split}-r{self.n_real}-g{self.n_generated}"
            f"-{self.img_size}px"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tag": self.tag}


@dataclass(frozen=True)
class MetricSettings:
    """Settings of torch-fidelity's metric code; the defaults are torch-fidelity's own."""

    batch_size: int = DEFAULTS["batch_size"]  # images per feature-extractor call
    isc_splits: int = DEFAULTS["isc_splits"]  # IS is averaged over this many splits
    kid_subsets: int = DEFAULTS["kid_subsets"]  # KID is averaged over this many subsets
    kid_subset_size: int = DEFAULTS["kid_subset_size"]  # images per KID subset, each side
    rng_seed: int = DEFAULTS["rng_seed"]  # IS shuffling and KID subset choice


class Evaluator:
    """IS, FID and KID of generated images against one real split, with cached references.

    Parameters:
        data               `data` config (name, root, img_size, channels).
        extractor          `metrics.extractor`: an entry of EXTRACTORS.
        split              Real split behind the reference statistics.
        n_real             `metrics.n_real`: real images used; None uses the whole split.
        cache_dir          Cache folder for images, extractor weights and reference statistics.
        device             Where the feature extractor runs.
        inception_weights  `metrics.inception_weights`: local Inception-v3 weights, or None.
        settings           torch-fidelity metric settings; None uses torch-fidelity's defaults.
    """

    def __init__(
        self,
        data: Mapping[str, Any],
        extractor: str,
        split: str,
        n_real: int | None,
        cache_dir: str | os.PathLike,
        device: torch.device | str,
        inception_weights: str | None = None,
        settings: MetricSettings | None = None,
    ):
        validate_data(data)
        prepare = EXTRACTORS.get(extractor, "metrics.extractor")
        self.data = dict(data)
        self.cache_dir = Path(cache_dir)
        self.device = torch.device(device)
        self.settings = settings or MetricSettings()
        self.real = load_images(data, split, cache_dir)
        self.n_real = _check_n_real(n_real, self.real)
        self.weights = prepare(data, self.cache_dir, self.device, inception_weights)
        self.layers = _layers(self.weights)
        self.extractor = self.weights.build(sorted(set(self.layers.values())), self.device)
        self.reference_cache_hit: bool | None = None  # set by the first evaluation
        self.reference_seconds = 0.0  # time spent on the real images, including cache reads
        self._reference: dict[str, np.ndarray] | None = None
        self._reference_path: Path | None = None


    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], device: torch.device | str) -> "Evaluator":
        """Build the evaluator of a launch config: its data, `metrics` section and cache_dir."""
        m = cfg["metrics"]
        return cls(
            cfg["data"],
            m["extractor"],
            cfg["data"]["split"],
            m["n_real"],
            cfg["cache_dir"],
            device,
            inception_weights=m["inception_weights"],
        )
    def protocol(self, n_generated: int) -> Protocol:
        return Protocol(
            self.weights.name,
            self.real.name,
            self.real.split,
            self.real.img_size,
            n_generated,
            self.n_real,
        )

    def evaluate(
        self,
        sample: Callable[[int], torch.Tensor],
        n_generated: int,
        metrics: Sequence[str] = METRICS,
    ) -> dict[str, Any]:
        """Return the requested metrics of `n_generated` images drawn from `sample`.

        `sample(k)` returns k images (k, C, H, W), float in [-1, 1] or uint8, on any device;
        it is called in batches of `settings.batch_size`. The result contains `fid`, `is` and
        `is_std`, `kid` and `kid_std` for the requested metrics, and `protocol` (a dict).
        """
        metrics = _check_metrics(metrics)
        _check_counts(metrics, n_generated, self.n_real, self.settings)
        started = time.monotonic()
        reference = self.reference(need_features="kid" in metrics)
        self.reference_seconds = time.monotonic() - started
        batches = _sample_batches(sample, n_generated, self.settings.batch_size, self.real)
        generated = extract_features(self.extractor, batches, self.layers, n_generated)
        values = compute_metrics(reference, generated, metrics, self.settings)
        return {**values, "protocol": self.protocol(n_generated).to_dict()}

    def reference(self, need_features: bool = False) -> dict[str, np.ndarray]:
        """Return the reference statistics, read from the cache or computed and cached once.

        Keys: `mu` and `sigma` of the FID layer, and with `need_features` also `features` of
        the KID layer, (n_real, D) float32.
        """
        if self._reference is not None and (not need_features or "features" in self._reference):
            return self._reference
        path = self.reference_path()
        self.reference_cache_hit = path.exists()
        if not self.reference_cache_hit:
            with locked(path):
                self.reference_cache_hit = path.exists()
                if not self.reference_cache_hit:
                    self._compute_reference(path)
        log.info(
            "reference statistics %s: %s",
            "cache hit" if self.reference_cache_hit else "computed and cached",
            path,
        )
        with np.load(path, allow_pickle=False) as archive:
            names = ["mu", "sigma"] + (["features"] if need_features else [])
            self._reference = {name: archive[name] for name in names}
        return self._reference

    def reference_path(self) -> Path:
        """Return the cache file of the reference statistics for this protocol's real side."""
        key = cache_key(
            {
                "images": self.real.key,
                "extractor": self.weights.name,
                "weights_sha256": self.weights.sha256,
                "layers": self.layers,
                "n_real": self.n_real,
                "subset_seed": REAL_SUBSET_SEED,
            }
        )
        real = self.real
        name = f"{self.weights.name}-{real.name}-{real.split}-r{self.n_real}-{real.img_size}px"
        return self.cache_dir / "reference" / f"{name}-{key}.npz"

    def _compute_reference(self, path: Path) -> None:
        log.info("computing reference statistics of %d real images into %s", self.n_real, path)
        images = real_subset(self.real, self.n_real)
        batch_size = self.settings.batch_size
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        features = extract_features(self.extractor, batches, self.layers, len(images))
        statistics = fid_features_to_statistics(features["fid"])
        kid_features = features["kid"].numpy().astype(np.float32)
        atomic_write(
            path,
            lambda temp: np.savez(
                temp, mu=statistics["mu"], sigma=statistics["sigma"], features=kid_features
            ),
            suffix=".npz",
        )


def real_subset(image_set: ImageSet, n_real: int) -> torch.Tensor:
    """Return `n_real` images of the set, chosen by a fixed seeded permutation (all if equal)."""
    if n_real == len(image_set):
        return image_set.images
    generator = torch.Generator().manual_seed(REAL_SUBSET_SEED)
    index = torch.randperm(len(image_set), generator=generator)[:n_real]
    return image_set.images[index]


def compare_images(
    reference: torch.Tensor,
    images: torch.Tensor,
    data: Mapping[str, Any],
    extractor: str,
    cache_dir: str | os.PathLike,
    device: torch.device | str,
    metrics: Sequence[str] = ("fid",),
    inception_weights: str | None = None,
    settings: MetricSettings | None = None,
) -> dict[str, float]:
    """Return metrics of `images` against `reference`, two in-memory image sets.

    Both are (N, C, H, W), uint8 or float in [-1, 1]. `data` selects the dataset whose
    classifier is used when `extractor` is 'classifier'. IS is computed on `images`. Nothing
    is cached except the extractor's weights.
    """
    metrics = _check_metrics(metrics)
    settings = settings or MetricSettings()
    _check_counts(metrics, len(images), len(reference), settings)
    device = torch.device(device)
    weights = EXTRACTORS.get(extractor, "metrics.extractor")(
        data, Path(cache_dir), device, inception_weights
    )
    layers = _layers(weights)
    network = weights.build(sorted(set(layers.values())), device)

    def batches(tensor: torch.Tensor) -> Iterable[torch.Tensor]:
        for start in range(0, len(tensor), settings.batch_size):
            yield tensor[start : start + settings.batch_size]

    real = extract_features(network, batches(reference), layers, len(reference))
    fake = extract_features(network, batches(images), layers, len(images))
    statistics = fid_features_to_statistics(real["fid"])
    statistics["features"] = real["kid"].numpy()
    return compute_metrics(statistics, fake, metrics, settings)


def compute_metrics(
    reference: Mapping[str, np.ndarray],
    generated: Mapping[str, torch.Tensor],
    metrics: Sequence[str],
    settings: MetricSettings,
) -> dict[str, float]:
    """Apply torch-fidelity's FID, IS and KID to reference statistics and generated features.

    `reference` has `mu`, `sigma` and (for KID) `features`; `generated` has one feature
    tensor per metric ('fid', 'is', 'kid'), as `extract_features` returns them.
    """
    # Generated images go first and real ones second, as input1 and input2 of torch-fidelity's
    # calculate_metrics, so KID draws the same random subsets as that function does.
    values: dict[str, float] = {}
    if "fid" in metrics:
        statistics = fid_features_to_statistics(generated["fid"])
        real = {"mu": reference["mu"], "sigma": reference["sigma"]}
        values["fid"] = fid_statistics_to_metric(statistics, real, False)[KEY_METRIC_FID]
    if "is" in metrics:
        score = isc_features_to_metric(
            generated["is"], settings.isc_splits, True, settings.rng_seed
        )
        values["is"] = score[KEY_METRIC_ISC_MEAN]
        values["is_std"] = score[KEY_METRIC_ISC_STD]
    if "kid" in metrics:
        score = kid_features_to_metric(
            generated["kid"],
            torch.from_numpy(np.asarray(reference["features"])),
            kid_subsets=settings.kid_subsets,
            kid_subset_size=settings.kid_subset_size,
            rng_seed=settings.rng_seed,
            verbose=False,
        )
        values["kid"] = score[KEY_METRIC_KID_MEAN]
        values["kid_std"] = score[KEY_METRIC_KID_STD]
    return values


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    layers: Mapping[str, str],
    total: int,
) -> dict[str, torch.Tensor]:
    """Run the extractor on image batches; return CPU features keyed by metric name.

    `layers` maps metric ('fid', 'is', 'kid') to the extractor's layer name; a batch is
    (B, C, H, W), uint8 or float in [-1, 1], with C = 1 repeated to 3 channels.
    """
    device = next(extractor.parameters()).device
    names = list(extractor.get_requested_features_list())
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    # disable=None hides the bar when stderr is not a terminal, as in Ray Tune workers
    with tqdm(total=total, desc="features", unit="img", leave=False, disable=None) as progress:
        for batch in batches:
            batch = batch.to(device)
            if batch.dtype != torch.uint8:
                batch = to_uint8(batch)
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            outputs = extractor.convert_features_tuple_to_dict(extractor(batch))
            for name in names:
                collected[name].append(outputs[name].to("cpu", torch.float32))
            progress.update(len(batch))
    features = {name: torch.cat(parts) for name, parts in collected.items()}
    return {metric: features[layer] for metric, layer in layers.items()}


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Write images (N, C, H, W), uint8 or float in [-1, 1], as one PNG grid, atomically."""
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        images = images.to(torch.float32) / 255
    else:
        images = ((images + 1) / 2).clamp(0, 1)
    atomic_write(
        path,
        lambda temp: torchvision.utils.save_image(images, temp, nrow=nrow, format="png"),
        suffix=".png",
    )


def _layers(weights: ExtractorWeights) -> dict[str, str]:
    return {metric: default_feature_layer(weights, FIDELITY_METRIC[metric]) for metric in METRICS}


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics {list(metrics)} must be a non-empty subset of {METRICS}")
    return tuple(metrics)


def _check_n_real(n_real: int | None, real: ImageSet) -> int:
    if n_real is None:
        n_real = len(real)
    if n_real > len(real):
        raise ConfigError(
            f"metrics.n_real: {n_real} real images requested but split {real.split!r} of "
            f"{real.name!r} has {len(real)}; set metrics.n_real to at most {len(real)} or null"
        )
    if n_real < 2:
        raise ConfigError(
            f"metrics.n_real: FID needs at least 2 real images, got {n_real}; raise metrics.n_real"
        )
    return n_real


def _check_counts(
    metrics: Sequence[str], n_generated: int, n_real: int, settings: MetricSettings
) -> None:
    if "fid" in metrics and n_generated < 2:
        raise ConfigError(
            f"metrics.n_generated: FID needs at least 2 generated images, got {n_generated}"
        )
    if "is" in metrics and n_generated < settings.isc_splits:
        raise ConfigError(
            f"metrics.n_generated: IS averages over {settings.isc_splits} splits, so it needs at "
            f"least {settings.isc_splits} generated images, got {n_generated}"
        )
    if "kid" in metrics:
        size = settings.kid_subset_size
        if n_generated < size:
            raise ConfigError(
                f"metrics.n_generated: KID draws subsets of {size} images, but only "
                f"{n_generated} generated images were requested; set metrics.n_generated >= {size}"
            )
        if n_real < size:
            raise ConfigError(
                f"metrics.n_real: KID draws subsets of {size} images, but only {n_real} real "
                f"images are used; set metrics.n_real >= {size}"
            )


def _sample_batches(
    sample: Callable[[int], torch.Tensor], n: int, batch_size: int, real: ImageSet
) -> Iterable[torch.Tensor]:
    expected = (real.channels, real.img_size, real.img_size)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        batch = sample(count)
        if tuple(batch.shape) != (count, *expected):
            raise ValueError(
                f"sample({count}) returned shape {tuple(batch.shape)}; expected {(count, *expected)}"
            )
        yield batch
