"""Feature extractors for IS, FID and KID, registered with torch-fidelity.

`EXTRACTORS` maps a `metrics.extractor` name to a function that locates (or trains) the
extractor's weights and returns an `ExtractorWeights`. Its `build(layers, device)` creates the
network through torch-fidelity's own registry, so the metric code gets a standard
`FeatureExtractorBase` that takes uint8 (B, 3, H, W) images.

- `inception-v3-compat`: torch-fidelity's Inception-v3 port of the TensorFlow FID network.
  The weights come from `metrics.inception_weights` or from where torch-fidelity downloads
  them (the torch hub checkpoints folder); nothing is downloaded here.
- `classifier`: a small CNN trained on the training split of the configured dataset, cached
  in the cache folder. Works offline; FID/KID use its pooled features, IS its logits.
"""

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from anas.cache import atomic_write, cache_key, file_sha256, locked
from anas.data import DATASETS, ImageSet, load_images, to_float
from anas.errors import ConfigError
from anas.registry import Registry

log = logging.getLogger(__name__)

CLASSIFIER_FIDELITY_NAME = "anas-classifier"


@dataclass(frozen=True)
class ExtractorWeights:
    """A feature extractor ready to build: its torch-fidelity name and a weights file."""

    name: str  # name in EXTRACTORS (and in protocol tags)
    fidelity_name: str  # name in torch-fidelity's registry
    path: Path
    sha256: str

    def build(self, layers: list[str], device: torch.device | str) -> nn.Module:
        """Create the extractor through torch-fidelity, returning the requested layers."""
        try:
            extractor = create_feature_extractor(
                self.fidelity_name,
                layers,
                cuda=False,
                feature_extractor_weights_path=str(self.path),
                verbose=False,
            )
        except RuntimeError as error:
            # load_state_dict raises RuntimeError for missing, unexpected or misshapen tensors
            if self.name != "inception-v3-compat":
                raise
            raise ConfigError(
                f"metrics.inception_weights: {self.path} does not fit the {self.name} network "
                f"({str(error).splitlines()[0]})"
            ) from error
        return extractor.to(device)


def default_feature_layer(extractor: ExtractorWeights, metric: str) -> str:
    """Return the torch-fidelity feature layer used for `metric` ('isc', 'fid' or 'kid')."""
    fidelity_class = FEATURE_EXTRACTORS_REGISTRY[extractor.fidelity_name]
    return fidelity_class.get_default_feature_layer_for_metric(metric)


# (data, cache_dir, device, inception_weights) -> ExtractorWeights
PrepareExtractor = Callable[[Mapping[str, Any], Path, torch.device, str | None], ExtractorWeights]

EXTRACTORS: Registry[PrepareExtractor] = Registry("feature extractor")


# ---------------------------------------------------------------------------------------------
# inception-v3-compat


def inception_download_path() -> Path:
    """Return where torch-fidelity's download of the Inception-v3 weights is stored."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def resolve_inception_weights(configured: str | None) -> Path:
    """Return a readable Inception-v3 state dict file, or raise ConfigError saying how to get one.

    `configured` is `metrics.inception_weights`; when it is empty the file torch-fidelity
    downloads is looked up in the torch hub cache. The file is opened with
    `weights_only=True` first, so a file that is not a plain state dict is rejected before
    torch-fidelity loads it with full unpickling.
    """
    how_to_get = (
        f"download {URL_INCEPTION_V3} (the file torch-fidelity uses) and either put it at "
        f"{inception_download_path()} or set metrics.inception_weights to its path"
    )
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise ConfigError(f"metrics.inception_weights: file {path} not found; {how_to_get}")
    else:
        path = inception_download_path()
        if not path.is_file():
            raise ConfigError(
                f"metrics.inception_weights: not set, and Inception-v3 weights not found at "
                f"{path} (this machine does not download them); {how_to_get}"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a corrupt or foreign file
        raise ConfigError(
            f"metrics.inception_weights: cannot read {path} as a state dict ({error}); {how_to_get}"
        ) from error
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(
            f"metrics.inception_weights: {path} is not a state dict of tensors; {how_to_get}"
        )
    return path


@EXTRACTORS.register("inception-v3-compat")
def prepare_inception(
    data: Mapping[str, Any], cache_dir: Path, device: torch.device, inception_weights: str | None
) -> ExtractorWeights:
    path = resolve_inception_weights(inception_weights)
    return ExtractorWeights("inception-v3-compat", "inception-v3-compat", path, file_sha256(path))


# ---------------------------------------------------------------------------------------------
# classifier: a small CNN trained on the dataset's own labelled training split


@dataclass(frozen=True)
class ClassifierSettings:
    """Training settings of the offline classifier; all of them key its cache entry."""

    width: int = 16  # channels of the first convolution; later ones use 2x and 4x
    epochs: int = 20  # passes over the split, unless max_steps comes first
    max_steps: int = 800  # bounds training on large splits (CIFAR-10: about 2 epochs)
    batch_size: int = 128
    lr: float = 2e-3  # Adam learning rate, decayed to zero by a cosine schedule
    weight_decay: float = 1e-4
    seed: int = 0  # initial weights and batch order
    split: str = "train"  # labelled split the classifier learns from


class SmallConvNet(nn.Module):
    """Four 3x3 convolution blocks, global average pooling and a linear classifier.

    Input is float (B, 3, H, W) in [-1, 1]; `features` is (B, 4 * width), `logits` (B, classes).
    """

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 3:
                layers.append(nn.MaxPool2d(2))  # halves H and W
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))  # (B, 4 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat a single channel to three; torch-fidelity extractors take (B, 3, H, W)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class ClassifierFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity wrapper of a trained `SmallConvNet`, read from a state dict file."""

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path=None, **kwargs
    ):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("the classifier extractor needs feature_extractor_weights_path")
        state = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        num_classes, width = state["head.weight"].shape[0], state["body.0.weight"].shape[0]
        self.net = SmallConvNet(num_classes, width)
        self.net.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        features = self.net.features(to_float(x))
        outputs = {"features": features, "logits": self.net.head(features)}
        return tuple(outputs[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


if CLASSIFIER_FIDELITY_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER_FIDELITY_NAME, ClassifierFeatureExtractor)


def train_classifier(
    train_set: ImageSet,
    settings: ClassifierSettings,
    device: torch.device | str,
    test_set: ImageSet | None = None,
) -> tuple[SmallConvNet, dict[str, float]]:
    """Train a `SmallConvNet` on `train_set`; return it (on CPU, eval mode) and its test accuracy.

    Deterministic on CPU for a given seed. A tqdm bar on stderr shows the steps.
    """
    if train_set.num_classes < 2 or bool((train_set.labels < 0).any()):
        raise ConfigError(
            f"metrics.extractor: the classifier needs labelled images of at least two classes, "
            f"but split {settings.split!r} of {train_set.name!r} has {train_set.num_classes} "
            f"class(es) or unlabelled images; use metrics.extractor=inception-v3-compat"
        )
    device = torch.device(device)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = SmallConvNet(train_set.num_classes, settings.width).to(device)
    optimizer = torch.optim.Adam(
        net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    images = _rgb(train_set.images)
    labels = train_set.labels
    batch_size = min(settings.batch_size, len(labels))
    steps = min(settings.max_steps, math.ceil(settings.epochs * len(labels) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    net.train()
    order = torch.randperm(len(labels), generator=generator)
    position = 0
    progress = tqdm(range(steps), desc=f"classifier {train_set.name}", leave=False)
    for _ in progress:
        if position + batch_size > len(order):
            order = torch.randperm(len(labels), generator=generator)
            position = 0
        index = order[position : position + batch_size]
        position += batch_size
        x = to_float(images[index].to(device))
        y = labels[index].to(device)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    net.eval()
    accuracy = {}
    if test_set is not None:
        accuracy["test_accuracy"] = classifier_accuracy(net, test_set, device)
    return net.cpu(), accuracy


@torch.no_grad()
def classifier_accuracy(
    net: SmallConvNet, image_set: ImageSet, device: torch.device | str, batch_size: int = 500
) -> float:
    """Return the fraction of `image_set` that `net` (in eval mode) labels correctly."""
    correct = 0
    for start in range(0, len(image_set), batch_size):
        x = to_float(_rgb(image_set.images[start : start + batch_size]).to(device))
        predicted = net(x).argmax(dim=1).cpu()
        correct += int((predicted == image_set.labels[start : start + batch_size]).sum())
    return correct / len(image_set)


@EXTRACTORS.register("classifier")
def prepare_classifier(
    data: Mapping[str, Any],
    cache_dir: Path,
    device: torch.device,
    inception_weights: str | None = None,
    settings: ClassifierSettings = ClassifierSettings(),
) -> ExtractorWeights:
    """Return the cached classifier for `data`, training and caching it on the first call."""
    train_set = load_images(data, settings.split, cache_dir)
    key = cache_key({"images": train_set.key, "settings": asdict(settings)})
    stem = f"classifier-{train_set.name}-{train_set.img_size}px-{train_set.channels}c-{key}"
    path = Path(cache_dir) / "extractors" / f"{stem}.pt"
    if path.exists():
        log.info("classifier extractor: cache hit %s", path)
    else:
        with locked(path):
            if not path.exists():
                _train_and_save(data, train_set, settings, device, cache_dir, path)
    return ExtractorWeights("classifier", CLASSIFIER_FIDELITY_NAME, path, file_sha256(path))


def _train_and_save(
    data: Mapping[str, Any],
    train_set: ImageSet,
    settings: ClassifierSettings,
    device: torch.device,
    cache_dir: Path,
    path: Path,
) -> None:
    log.info("training the classifier extractor on %s %r", train_set.name, settings.split)
    test_set = None
    if "test" in _splits_of(data) and settings.split != "test":
        try:
            test_set = load_images(data, "test", cache_dir)
        except ConfigError as error:
            log.info("no test split to measure the classifier on: %s", error)
    net, accuracy = train_classifier(train_set, settings, device, test_set)
    log.info("classifier extractor accuracy: %s", accuracy)
    atomic_write(path, lambda temp: torch.save(net.state_dict(), temp))
    summary = {"dataset": train_set.name, "settings": asdict(settings), **accuracy}
    atomic_write(path.with_suffix(".json"), lambda temp: Path(temp).write_text(json.dumps(summary)))


def _splits_of(data: Mapping[str, Any]) -> tuple[str, ...]:
    return DATASETS.get(data["name"], "data.name").splits
