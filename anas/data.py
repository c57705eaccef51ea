"""Datasets as uint8 tensors in memory, decoded once and cached on disk, and a resumable sampler.

`load_images(data, split, cache_dir)` returns an `ImageSet` whose images are uint8
(N, C, H, W) and labels int64 (N,). The decoded arrays are cached as an uncompressed `.npz`
(read without pickle) under `<cache_dir>/images/`, named by a key of the dataset, its resolved
source (path, size, mtime), the split, the image size and the channel count.

`BatchStream` draws training batches in [-1, 1] from an `ImageSet` by seeded epoch
permutations and can be checkpointed and resumed bit-identically.
"""

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from anas.cache import atomic_write, cache_key, extract_zip, locked, source_fingerprint
from anas.errors import ConfigError
from anas.registry import Registry

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff")

# PIL modes with one intensity channel; every other mode is read as RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")

# Fixed train/test partition of scikit-learn's digits: 80 % train after a seeded permutation.
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8

TORCHVISION_FOLDER = "torchvision"


@dataclass
class ImageSet:
    """Decoded images of one dataset split, held in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where the split is unlabelled
    num_classes: int
    name: str
    split: str
    classes: tuple[str, ...]
    # SHA-256 prefix of the decoded images, labels and class names: caches derived from the
    # images (classifier weights, reference statistics) use it, so the same images read from
    # a folder or from a zip of it share those caches.
    key: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def img_size(self) -> int:
        return self.images.shape[-1]


@dataclass
class Decoded:
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, decode and split one dataset."""

    channels: int | None  # native channel count; None: read from the images themselves
    splits: tuple[str, ...]
    # (root, cache_dir) -> the file or folder whose fingerprint keys the decoded cache
    locate: Callable[[str | None, Path], Path]
    # (source, split, img_size, channels, cache_dir) -> decoded arrays
    decode: Callable[[Path, str, int, int, Path], Decoded]
    how_to_get: str


DATASETS: Registry[DatasetSpec] = Registry("dataset")


# ---------------------------------------------------------------------------------------------
# Public API


def validate_data(data: Mapping[str, Any]) -> DatasetSpec:
    """Check `data.name`, `data.img_size` and `data.channels`; return the dataset's spec."""
    spec = DATASETS.get(data["name"], "data.name")
    img_size = data["img_size"]
    if not isinstance(img_size, int) or img_size < 16 or img_size % 8 != 0:
        raise ConfigError(
            f"data.img_size: invalid value {img_size!r}; use a multiple of 8 that is at least 16"
        )
    channels = data["channels"]
    if channels not in (1, 3):
        raise ConfigError(f"data.channels: invalid value {channels!r}; use 1 or 3")
    if spec.channels is not None and channels != spec.channels:
        raise ConfigError(
            f"data.channels: dataset {data['name']!r} has {spec.channels} channel(s) but "
            f"data.channels={channels}; set data.channels={spec.channels}"
        )
    return spec


def load_images(data: Mapping[str, Any], split: str, cache_dir: str | os.PathLike) -> ImageSet:
    """Return one split of the dataset `data` (keys name, root, img_size, channels).

    Decodes on the first call and stores the result under `<cache_dir>/images/`; later calls
    read that file. Raises ConfigError for a missing or invalid dataset, naming the key.
    """
    spec = validate_data(data)
    name, img_size, channels = data["name"], data["img_size"], data["channels"]
    if split not in spec.splits:
        raise ConfigError(
            f"data.split: dataset {name!r} has no split {split!r}; "
            f"expected one of {', '.join(spec.splits)}"
        )
    cache_dir = Path(cache_dir)
    source = spec.locate(data.get("root"), cache_dir)
    key = cache_key(
        {
            "dataset": name,
            "source": source_fingerprint(source),
            "split": split,
            "img_size": img_size,
            "channels": channels,
        }
    )
    path = cache_dir / "images" / f"{name}-{split}-{img_size}px-{channels}c-{key}.npz"
    if not path.exists():
        with locked(path):
            if not path.exists():
                log.info("decoding %s split %r from %s", name, split, source)
                decoded = spec.decode(source, split, img_size, channels, cache_dir)
                _check_decoded(decoded, name, split, source)
                atomic_write(path, lambda temp: _save_decoded(decoded, temp), suffix=".npz")
                log.info("cached %d images in %s", len(decoded.labels), path)
    with np.load(path, allow_pickle=False) as archive:
        images = torch.from_numpy(archive["images"])
        labels = torch.from_numpy(archive["labels"])
        classes = tuple(str(c) for c in archive["classes"])
        content_key = str(archive["content_key"])
    return ImageSet(images, labels, len(classes), name, split, classes, content_key)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Convert images in [-1, 1] to uint8 in [0, 255], rounding and clamping."""
    return ((images.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images in [0, 255] to float32 in [-1, 1] (the inverse of `to_uint8`)."""
    return images.to(torch.float32) / 127.5 - 1


class BatchStream:
    """Endless batches of an ImageSet in [-1, 1], by seeded epoch permutations.

    Each epoch draws a permutation from a `torch.Generator` seeded with `seed` and hands it
    out in order. A request larger than what remains of the epoch starts the next epoch, so
    the incomplete tail is dropped. The images are copied to `device` once.
    """

    def __init__(self, image_set: ImageSet, seed: int, device: torch.device | str):
        self.device = torch.device(device)
        self.images = image_set.images.to(self.device)
        self.seed = seed
        self.epoch = -1
        self.position = 0
        self._generator = torch.Generator().manual_seed(seed)
        # generator state before the current epoch's permutation, so a resume can redraw it
        self._epoch_start_state = self._generator.get_state()
        self._permutation = torch.empty(0, dtype=torch.int64)

    def next(self, n: int) -> torch.Tensor:
        """Return the next `n` images as float32 (n, C, H, W) in [-1, 1] on the device."""
        if not 0 < n <= len(self.images):
            raise ValueError(f"batch size {n} must be between 1 and the dataset size")
        if self.position + n > len(self._permutation):
            self._start_epoch()
        index = self._permutation[self.position : self.position + n]
        self.position += n
        return to_float(self.images[index.to(self.device)])

    def _start_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._epoch_start_state = self._generator.get_state()
        self._permutation = torch.randperm(len(self.images), generator=self._generator)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "epoch_start_state": self._epoch_start_state.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._generator.set_state(state["epoch_start_state"])
        self._epoch_start_state = self._generator.get_state()
        if self.epoch >= 0:
            self._permutation = torch.randperm(len(self.images), generator=self._generator)
        else:
            self._permutation = torch.empty(0, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Shared decoding helpers


def _save_decoded(decoded: Decoded, path: str) -> None:
    images = np.ascontiguousarray(decoded.images)
    labels = decoded.labels.astype(np.int64)
    digest = hashlib.sha256()
    digest.update(str(images.shape).encode())
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    digest.update("\0".join(decoded.classes).encode())
    np.savez(
        path,
        images=images,
        labels=labels,
        classes=np.array(decoded.classes, dtype=str),
        content_key=np.array(digest.hexdigest()[:16]),
    )


def _check_decoded(decoded: Decoded, name: str, split: str, source: Path) -> None:
    if len(decoded.labels) == 0:
        raise ConfigError(f"data.root: no images of {name!r} split {split!r} found in {source}")


def resize_images(images: np.ndarray, img_size: int) -> np.ndarray:
    """Resize uint8 (N, C, H, W) so the shorter side is `img_size`, then centre-crop to square.

    Bilinear with antialiasing, so downscaling averages instead of skipping pixels.
    """
    height, width = images.shape[-2:]
    if height == width == img_size:
        return images
    scale = img_size / min(height, width)
    new_size = (max(img_size, round(height * scale)), max(img_size, round(width * scale)))
    result = np.empty((len(images), images.shape[1], img_size, img_size), dtype=np.uint8)
    for start in range(0, len(images), 1024):
        chunk = torch.from_numpy(images[start : start + 1024]).to(torch.float32)
        chunk = F.interpolate(chunk, size=new_size, mode="bilinear", antialias=True)
        top = (new_size[0] - img_size) // 2
        left = (new_size[1] - img_size) // 2
        chunk = chunk[..., top : top + img_size, left : left + img_size]
        result[start : start + 1024] = chunk.round().clamp(0, 255).to(torch.uint8).numpy()
    return result


def _resize_pil(image: Image.Image, img_size: int) -> Image.Image:
    width, height = image.size
    if width == height == img_size:
        return image
    scale = img_size / min(width, height)
    new_size = (max(img_size, round(width * scale)), max(img_size, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - img_size) // 2
    top = (new_size[1] - img_size) // 2
    return image.crop((left, top, left + img_size, top + img_size))


def _mode_channels(mode: str) -> int:
    return 1 if mode in GRAYSCALE_MODES else 3


def _split_folder(folder: Path, split: str, name: str) -> Path:
    """Return the folder of `split` inside an image folder (train/, test/ or val/ if present)."""
    split_names = {"train": ("train",), "test": ("test", "val")}[split]
    has_split_folders = any((folder / s).is_dir() for s in ("train", "test", "val"))
    if not has_split_folders:
        if split == "train":
            return folder
        raise ConfigError(
            f"data.split: {folder} has no train/ and test/ (or val/) subfolders, so {name!r} has "
            f"only a train split; use split 'train' or add a test/ folder of class subfolders"
        )
    for candidate in split_names:
        if (folder / candidate).is_dir():
            return folder / candidate
    raise ConfigError(
        f"data.root: {folder} has no {' or '.join(s + '/' for s in split_names)} subfolder "
        f"for split {split!r}"
    )


def read_image_folder(
    folder: Path, split: str, img_size: int, channels: int, name: str, strict: bool
) -> Decoded:
    """Decode `<folder>[/<split>]/<class>/<image>` into uint8 arrays, classes sorted by name.

    `strict` rejects a folder whose images differ in size or channel count, naming the first
    file that differs, and a folder whose channel count differs from `channels`. Without it,
    every image is converted to `channels` and may have any size (photo datasets such as
    Imagenette). Images are resized (shorter side) and centre-cropped to `img_size`.
    """
    split_dir = _split_folder(folder, split, name)
    classes = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    files: list[tuple[Path, int]] = []
    for label, class_name in enumerate(classes):
        class_dir = split_dir / class_name
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                files.append((file, label))
    if not files:
        raise ConfigError(
            f"data.root: no images found in {split_dir}; expected class subfolders containing "
            f"{', '.join(IMAGE_EXTENSIONS)} files"
        )

    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(files), channels, img_size, img_size), dtype=np.uint8)
    labels = np.array([label for _, label in files], dtype=np.int64)
    first: tuple[Path, tuple[int, int], int] | None = None
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as image:
                if strict:
                    first = _check_uniform(file, image, first, channels)
                else:
                    image.draft(mode, (img_size, img_size))
                image = _resize_pil(image.convert(mode), img_size)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(f"data.root: cannot read image {file}: {error}") from error
        images[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return Decoded(images, labels, tuple(classes))


def _check_uniform(
    file: Path,
    image: Image.Image,
    first: tuple[Path, tuple[int, int], int] | None,
    channels: int,
) -> tuple[Path, tuple[int, int], int]:
    image_channels = _mode_channels(image.mode)
    if first is None:
        if image_channels != channels:
            raise ConfigError(
                f"data.channels: images in the folder have {image_channels} channel(s) "
                f"({file} is mode {image.mode}) but data.channels={channels}; "
                f"set data.channels={image_channels}"
            )
        return file, image.size, image_channels
    first_file, first_size, first_channels = first
    if image.size != first_size:
        raise ConfigError(
            f"data.root: image {file} is {image.size[0]}x{image.size[1]} but {first_file} is "
            f"{first_size[0]}x{first_size[1]}; an image folder must contain images of one size"
        )
    if image_channels != first_channels:
        raise ConfigError(
            f"data.root: image {file} has {image_channels} channel(s) (mode {image.mode}) but "
            f"{first_file} has {first_channels}; an image folder must contain one channel count"
        )
    return first


def _find_image_folder(path: Path) -> Path | None:
    """Return `path` if it has a train/ subfolder, else its only subfolder that has one."""
    if (path / "train").is_dir():
        return path
    candidates = [entry for entry in path.iterdir() if (entry / "train").is_dir()]
    return candidates[0] if len(candidates) == 1 else None


def _require_root(root: str | None, name: str, how_to_get: str) -> Path:
    if root is None or str(root) == "":
        raise ConfigError(f"data.root: dataset {name!r} needs data.root; {how_to_get}")
    path = Path(root).expanduser()
    if not path.exists():
        raise ConfigError(f"data.root: {path} not found for dataset {name!r}; {how_to_get}")
    return path


def _download(name: str, create: Callable[[str], Any], cache_dir: Path, how_to_get: str) -> Path:
    """Run a torchvision constructor with download=True into `<cache_dir>/torchvision`.

    NOTE: only reached with data.root null; no machine the tests run on can download, so
    the successful download has not been run.
    """
    root = cache_dir / TORCHVISION_FOLDER
    with locked(root / name):
        log.info("data.root is empty: downloading %s with torchvision into %s", name, root)
        try:
            # torchvision reports download progress on stdout, which is kept for results
            with contextlib.redirect_stdout(sys.stderr):
                create(str(root))
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            raise ConfigError(
                f"data.root: downloading {name!r} into {root} failed ({error}); {how_to_get}"
            ) from error
    return root


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's 1,797 handwritten digits, 8x8 grayscale with values 0..16


def _locate_digits(root: str | None, cache_dir: Path) -> Path:
    # find_spec finds the package without importing it: importing scikit-learn takes about a
    # second, which every trial process would pay only to fingerprint this file.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("data.name: 'digits' needs scikit-learn, which is not installed")
    return Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"


def _decode_digits(
    source: Path, split: str, img_size: int, channels: int, cache_dir: Path
) -> Decoded:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    order = torch.randperm(len(labels), generator=generator).numpy()
    n_train = int(len(labels) * DIGITS_TRAIN_FRACTION)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    images = resize_images(images[chosen], img_size)
    return Decoded(images, labels[chosen], tuple(str(d) for d in range(10)))


DATASETS.add(
    "digits",
    DatasetSpec(
        channels=1,
        splits=("train", "test"),
        locate=_locate_digits,
        decode=_decode_digits,
        how_to_get="the images ship with scikit-learn; reinstall scikit-learn",
    ),
)


# ---------------------------------------------------------------------------------------------
# cifar10: torchvision's binary batches, an image folder of the same images, or a zip of one

CIFAR10_HOW_TO_GET = (
    "set data.root to a folder containing torchvision's cifar-10-batches-py, to an image folder "
    "with train/<class>/ and test/<class>/, or to a zip of such a folder (cifar10-jpeg.zip); "
    "or set data.root to null to download CIFAR-10 with torchvision (needs internet)"
)


def _locate_cifar10(root: str | None, cache_dir: Path) -> Path:
    import torchvision

    if root is None or str(root) == "":

        def create(folder: str) -> Any:
            return torchvision.datasets.CIFAR10(folder, train=True, download=True)

        folder = _download("cifar10", create, cache_dir, CIFAR10_HOW_TO_GET)
        return folder / "cifar-10-batches-py"
    path = _require_root(root, "cifar10", CIFAR10_HOW_TO_GET)
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise ConfigError(f"data.root: {path} is a file but not a zip; {CIFAR10_HOW_TO_GET}")
        return path
    if path.name == "cifar-10-batches-py":
        return path
    if (path / "cifar-10-batches-py").is_dir():
        return path / "cifar-10-batches-py"
    folder = _find_image_folder(path)
    if folder is None:
        raise ConfigError(f"data.root: no CIFAR-10 images found in {path}; {CIFAR10_HOW_TO_GET}")
    return folder


def _decode_cifar10(
    source: Path, split: str, img_size: int, channels: int, cache_dir: Path
) -> Decoded:
    if source.name == "cifar-10-batches-py":
        # NOTE: the tests read CIFAR-10 only as JPEGs; this branch for torchvision's binary
        # batches has not been run against the real files.
        import torchvision

        try:
            dataset = torchvision.datasets.CIFAR10(str(source.parent), train=split == "train")
        except RuntimeError as error:
            raise ConfigError(
                f"data.root: cannot read CIFAR-10 from {source} ({error}); {CIFAR10_HOW_TO_GET}"
            ) from error
        images = resize_images(dataset.data.transpose(0, 3, 1, 2), img_size)  # (N, 3, H, W)
        labels = np.array(dataset.targets, dtype=np.int64)
        return Decoded(images, labels, tuple(dataset.classes))
    if source.is_file():
        folder = _find_image_folder(extract_zip(source, cache_dir))
        if folder is None:
            raise ConfigError(f"data.root: no image folder inside {source}; {CIFAR10_HOW_TO_GET}")
        source = folder
    return read_image_folder(source, split, img_size, channels, "cifar10", strict=False)


DATASETS.add(
    "cifar10",
    DatasetSpec(
        channels=3,
        splits=("train", "test"),
        locate=_locate_cifar10,
        decode=_decode_cifar10,
        how_to_get=CIFAR10_HOW_TO_GET,
    ),
)


# ---------------------------------------------------------------------------------------------
# stl10: torchvision's binary files, 96x96 RGB, usually resized to 48 px

STL10_HOW_TO_GET = (
    "set data.root to a folder containing torchvision's stl10_binary, "
    "or set data.root to null to download STL-10 with torchvision (2.6 GB, needs internet)"
)
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")


def _locate_stl10(root: str | None, cache_dir: Path) -> Path:
    import torchvision

    if root is None or str(root) == "":

        def create(folder: str) -> Any:
            return torchvision.datasets.STL10(folder, split="train", download=True)

        return _download("stl10", create, cache_dir, STL10_HOW_TO_GET) / "stl10_binary"
    path = _require_root(root, "stl10", STL10_HOW_TO_GET)
    if path.name == "stl10_binary" and path.is_dir():
        return path
    if (path / "stl10_binary").is_dir():
        return path / "stl10_binary"
    raise ConfigError(f"data.root: no stl10_binary folder found in {path}; {STL10_HOW_TO_GET}")


def _decode_stl10(
    source: Path, split: str, img_size: int, channels: int, cache_dir: Path
) -> Decoded:
    import torchvision

    try:
        dataset = torchvision.datasets.STL10(str(source.parent), split=split)
    except RuntimeError as error:
        raise ConfigError(
            f"data.root: cannot read STL-10 from {source} ({error}); {STL10_HOW_TO_GET}"
        ) from error
    # torchvision stores STL-10 as (N, 3, 96, 96) with labels -1 in the unlabeled split.
    # NOTE: the tests have no STL-10 files (torchvision checks their MD5 sums), so this
    # successful read has not been run.
    images = resize_images(dataset.data, img_size)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    return Decoded(images, labels, tuple(dataset.classes))


DATASETS.add(
    "stl10",
    DatasetSpec(
        channels=3,
        splits=STL10_SPLITS,
        locate=_locate_stl10,
        decode=_decode_stl10,
        how_to_get=STL10_HOW_TO_GET,
    ),
)


# ---------------------------------------------------------------------------------------------
# imagenette: ten ImageNet classes as an image folder (train/ and val/), photos of any size

IMAGENETTE_HOW_TO_GET = (
    "set data.root to the extracted imagenette2 folder (train/ and val/ of class folders) or a "
    "zip of it, or set data.root to null to download the 160 px version with torchvision "
    "(needs internet)"
)


def _locate_imagenette(root: str | None, cache_dir: Path) -> Path:
    import torchvision

    if root is None or str(root) == "":

        def create(folder: str) -> Any:
            return torchvision.datasets.Imagenette(
                folder, split="train", size="160px", download=True
            )

        return _download("imagenette", create, cache_dir, IMAGENETTE_HOW_TO_GET) / "imagenette2-160"
    path = _require_root(root, "imagenette", IMAGENETTE_HOW_TO_GET)
    if path.is_file():
        return _zip_or_error(path, IMAGENETTE_HOW_TO_GET)
    folder = _find_image_folder(path)
    if folder is None:
        raise ConfigError(f"data.root: no train/ folder found in {path}; {IMAGENETTE_HOW_TO_GET}")
    return folder


def _decode_folder_or_zip(strict: bool, name: str) -> Callable[..., Decoded]:
    def decode(source: Path, split: str, img_size: int, channels: int, cache_dir: Path) -> Decoded:
        if source.is_file():
            source = _unwrap_single_folder(extract_zip(source, cache_dir))
        return read_image_folder(source, split, img_size, channels, name, strict=strict)

    return decode


def _unwrap_single_folder(folder: Path) -> Path:
    """Return the image folder inside an extracted zip that wraps it in one top-level folder."""
    found = _find_image_folder(folder)
    if found is not None:
        return found
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        inner = list(entries[0].iterdir())
        if inner and all(entry.is_dir() for entry in inner):
            return entries[0]
    return folder


def _zip_or_error(path: Path, how_to_get: str) -> Path:
    if path.suffix.lower() != ".zip":
        raise ConfigError(f"data.root: {path} is a file but not a zip; {how_to_get}")
    return path


DATASETS.add(
    "imagenette",
    DatasetSpec(
        channels=3,
        splits=("train", "test"),
        locate=_locate_imagenette,
        decode=_decode_folder_or_zip(strict=False, name="imagenette"),
        how_to_get=IMAGENETTE_HOW_TO_GET,
    ),
)


# ---------------------------------------------------------------------------------------------
# image_folder: any folder (or zip) of class subfolders containing images of one size and mode

IMAGE_FOLDER_HOW_TO_GET = (
    "set data.root to a folder of class subfolders of images, optionally split into train/ "
    "and test/ (or val/), or to a zip of such a folder"
)


def _locate_image_folder(root: str | None, cache_dir: Path) -> Path:
    path = _require_root(root, "image_folder", IMAGE_FOLDER_HOW_TO_GET)
    if path.is_file():
        return _zip_or_error(path, IMAGE_FOLDER_HOW_TO_GET)
    return path


DATASETS.add(
    "image_folder",
    DatasetSpec(
        channels=None,
        splits=("train", "test"),
        locate=_locate_image_folder,
        decode=_decode_folder_or_zip(strict=True, name="image_folder"),
        how_to_get=IMAGE_FOLDER_HOW_TO_GET,
    ),
)
