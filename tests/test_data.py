"""Datasets, the decoded-image cache, the batch stream and their input errors."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anas.cache import extract_zip
from anas.data import DATASETS, BatchStream, ImageSet, load_images, to_float, to_uint8
from anas.errors import ConfigError

DIGITS = {"name": "digits", "root": None, "img_size": 16, "channels": 1}


def folder_data(root, channels=3, img_size=16):
    return {"name": "image_folder", "root": str(root), "img_size": img_size, "channels": channels}


def write_images(folder: Path, count: int, size=(24, 24), mode="RGB", start=0):
    """Write `count` PNGs whose pixels encode their index, so decoding can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        array = np.full((size[1], size[0], 3), i * 10 % 256, dtype=np.uint8)
        image = Image.fromarray(array, "RGB").convert(mode)
        image.save(folder / f"{i:03d}.png")


# ---------------------------------------------------------------------------------------------
# Registry and digits


def test_registry_names():
    assert DATASETS.names() == ["digits", "cifar10", "stl10", "imagenette", "image_folder"]


def test_digits_shapes(tmp_path):
    train = load_images(DIGITS, "train", tmp_path)
    test = load_images(DIGITS, "test", tmp_path)
    assert train.images.shape == (1437, 1, 16, 16)
    assert test.images.shape == (360, 1, 16, 16)
    assert train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.num_classes == 10
    assert train.name == "digits"
    assert set(train.labels.tolist()) == set(range(10))
    assert int(train.images.max()) == 255


def test_digits_cached_without_sklearn(tmp_path):
    """Reading cached digits in a new process does not import scikit-learn (about 1 s)."""
    load_images(DIGITS, "train", tmp_path)
    code = (
        "import json, sys; from anas.data import load_images; "
        f"images = load_images(json.loads({json.dumps(json.dumps(DIGITS))}), 'train', "
        f"{str(tmp_path)!r}); print(len(images.labels), 'sklearn' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["1437", "False"]


def test_digits_32px(tmp_path):
    images = load_images({**DIGITS, "img_size": 32}, "train", tmp_path).images
    assert images.shape == (1437, 1, 32, 32)


def test_digits_split_fixed(tmp_path):
    first = load_images(DIGITS, "test", tmp_path / "a")
    second = load_images(DIGITS, "test", tmp_path / "b")
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)


def test_digits_split_disjoint(tmp_path):
    from sklearn.datasets import load_digits

    train = load_images(DIGITS, "train", tmp_path)
    test = load_images(DIGITS, "test", tmp_path)
    source = load_digits().images
    assert len(train) + len(test) == len(source)
    # an image in both splits would leave fewer distinct images than the source has
    distinct_source = {tuple(image.flatten().tolist()) for image in source}
    distinct_split = {tuple(x.flatten().tolist()) for x in torch.cat([train.images, test.images])}
    assert len(distinct_split) == len(distinct_source)


def test_cache_reused(tmp_path):
    first = load_images(DIGITS, "train", tmp_path)
    files = list((tmp_path / "images").glob("digits-train-*.npz"))
    assert len(files) == 1
    # a stamp in the cached file shows that the second load reads the file, not the source
    with np.load(files[0]) as archive:
        arrays = dict(archive)
    arrays["images"][0, 0, 0, 0] = 7 if arrays["images"][0, 0, 0, 0] != 7 else 8
    np.savez(files[0], **arrays)
    second = load_images(DIGITS, "train", tmp_path)
    assert int(second.images[0, 0, 0, 0]) == int(arrays["images"][0, 0, 0, 0])
    assert second.key == first.key


def test_cache_keyed_by_size(tmp_path):
    small = load_images(DIGITS, "train", tmp_path)
    large = load_images({**DIGITS, "img_size": 24}, "train", tmp_path)
    assert small.key != large.key
    assert len(list((tmp_path / "images").glob("*.npz"))) == 2


# ---------------------------------------------------------------------------------------------
# CIFAR-10 from the real JPEGs


def test_cifar10_folder(cifar10_root, anas_cache_dir):
    data = {"name": "cifar10", "root": str(cifar10_root), "img_size": 32, "channels": 3}
    train = load_images(data, "train", anas_cache_dir)
    test = load_images(data, "test", anas_cache_dir)
    assert train.images.shape == (50000, 3, 32, 32)
    assert test.images.shape == (10000, 3, 32, 32)
    assert train.labels.bincount().tolist() == [5000] * 10
    assert train.classes[0] == "airplane"
    assert train.classes[9] == "truck"
    assert float(train.images.float().std()) > 40


def test_cifar10_zip_matches_folder(cifar10_root, cifar10_zip, anas_cache_dir):
    folder = {"name": "cifar10", "root": str(cifar10_root), "img_size": 32, "channels": 3}
    archive = {**folder, "root": str(cifar10_zip)}
    from_folder = load_images(folder, "test", anas_cache_dir)
    from_zip = load_images(archive, "test", anas_cache_dir)
    assert torch.equal(from_folder.images, from_zip.images)
    assert torch.equal(from_folder.labels, from_zip.labels)
    assert from_folder.key == from_zip.key


def test_extract_zip_once(tmp_path):
    source = tmp_path / "source"
    write_images(source / "set" / "train" / "a", 2)
    archive_path = tmp_path / "set.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for file in sorted(source.rglob("*.png")):
            archive.write(file, file.relative_to(source))
    first = extract_zip(archive_path, tmp_path / "cache")
    second = extract_zip(archive_path, tmp_path / "cache")
    assert first == second
    assert (first / "set" / "train" / "a" / "000.png").is_file()
    leftovers = [p for p in first.parent.iterdir() if p.name.startswith(".") and p.is_dir()]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# image_folder


def test_image_folder_splits(tmp_path):
    write_images(tmp_path / "train" / "cats", 3)
    write_images(tmp_path / "train" / "dogs", 2, start=3)
    write_images(tmp_path / "val" / "cats", 1)
    write_images(tmp_path / "val" / "dogs", 1, start=3)
    train = load_images(folder_data(tmp_path), "train", tmp_path / "cache")
    test = load_images(folder_data(tmp_path), "test", tmp_path / "cache")
    assert train.images.shape == (5, 3, 16, 16)
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.classes == ("cats", "dogs")
    assert test.labels.tolist() == [0, 1]
    assert int(train.images[1, 0, 8, 8]) == 10


def test_image_folder_crops(tmp_path):
    # a 32x24 image becomes 21x16 after the shorter side is resized, then a 16x16 centre crop
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    array = np.zeros((24, 32, 3), dtype=np.uint8)
    array[:, 16:] = 200
    Image.fromarray(array).save(folder / "0.png")
    images = load_images(folder_data(tmp_path), "train", tmp_path / "cache").images
    assert images.shape == (1, 3, 16, 16)
    assert int(images[0, 0, 8, 0]) == 0
    assert int(images[0, 0, 8, 15]) == 200


def test_image_folder_grayscale(tmp_path):
    write_images(tmp_path / "a", 2, mode="L")
    images = load_images(folder_data(tmp_path, channels=1), "train", tmp_path / "cache").images
    assert images.shape == (2, 1, 16, 16)


def test_image_folder_zip(tmp_path):
    source = tmp_path / "source"
    write_images(source / "wrapped" / "train" / "a", 2)
    write_images(source / "wrapped" / "test" / "a", 1)
    archive_path = tmp_path / "images.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for file in sorted(source.rglob("*.png")):
            archive.write(file, file.relative_to(source))
    test = load_images(folder_data(archive_path), "test", tmp_path / "cache")
    assert test.images.shape == (1, 3, 16, 16)


def test_imagenette_mixed_photos(tmp_path):
    # photo datasets mix sizes and a few grayscale files; all become RGB squares
    for split, count in (("train", 3), ("val", 1)):
        folder = tmp_path / "imagenette2-160" / split / "n01440764"
        folder.mkdir(parents=True)
        for i in range(count):
            size = (40 + 10 * i, 30)
            mode = "L" if i == 1 else "RGB"
            Image.new(mode, size, color=100).save(folder / f"{i}.JPEG")
    data = {"name": "imagenette", "root": str(tmp_path), "img_size": 16, "channels": 3}
    train = load_images(data, "train", tmp_path / "cache")
    test = load_images(data, "test", tmp_path / "cache")
    assert train.images.shape == (3, 3, 16, 16)
    assert test.images.shape == (1, 3, 16, 16)
    assert abs(int(train.images[1, 2, 8, 8]) - 100) <= 2


# ---------------------------------------------------------------------------------------------
# Input errors


@pytest.mark.parametrize("img_size", [8, 20, 12, "32"])
def test_img_size_rejected(tmp_path, img_size):
    with pytest.raises(ConfigError, match="data.img_size"):
        load_images({**DIGITS, "img_size": img_size}, "train", tmp_path)


def test_digits_three_channels_rejected(tmp_path):
    with pytest.raises(ConfigError, match="data.channels") as error:
        load_images({**DIGITS, "channels": 3}, "train", tmp_path)
    assert "data.channels=1" in str(error.value)


def test_cifar10_one_channel_rejected(tmp_path):
    data = {"name": "cifar10", "root": str(tmp_path), "img_size": 32, "channels": 1}
    with pytest.raises(ConfigError, match="data.channels"):
        load_images(data, "train", tmp_path)


def test_unknown_name_rejected(tmp_path):
    with pytest.raises(ConfigError, match="data.name") as error:
        load_images({**DIGITS, "name": "mnist"}, "train", tmp_path)
    assert "cifar10" in str(error.value)


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(ConfigError, match="data.split"):
        load_images(DIGITS, "unlabeled", tmp_path)


def test_cifar10_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    data = {"name": "cifar10", "root": str(missing), "img_size": 32, "channels": 3}
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(data, "train", tmp_path)
    assert str(missing) in str(error.value)
    assert "cifar-10-batches-py" in str(error.value)


def test_cifar10_empty_root(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = {"name": "cifar10", "root": str(empty), "img_size": 32, "channels": 3}
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(data, "train", tmp_path)
    assert str(empty) in str(error.value)


def test_stl10_missing_folder(tmp_path):
    data = {"name": "stl10", "root": str(tmp_path), "img_size": 48, "channels": 3}
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(data, "train", tmp_path / "cache")
    assert "stl10_binary" in str(error.value)


def test_stl10_corrupt_files(tmp_path):
    (tmp_path / "stl10_binary").mkdir()
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\0" * 100)
    data = {"name": "stl10", "root": str(tmp_path), "img_size": 48, "channels": 3}
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(data, "train", tmp_path / "cache")
    assert "cannot read STL-10" in str(error.value)


def test_image_folder_needs_root(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        load_images({**folder_data(tmp_path), "root": None}, "train", tmp_path)


def test_image_folder_empty(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(folder_data(tmp_path), "train", tmp_path / "cache")
    assert "no images" in str(error.value)


def test_mixed_sizes_rejected(tmp_path):
    write_images(tmp_path / "a", 2, size=(24, 24))
    write_images(tmp_path / "b", 1, size=(20, 24), start=5)
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(folder_data(tmp_path), "train", tmp_path / "cache")
    assert "005.png" in str(error.value)


def test_mixed_channels_rejected(tmp_path):
    write_images(tmp_path / "a", 2)
    write_images(tmp_path / "b", 1, mode="L", start=5)
    with pytest.raises(ConfigError, match="channel") as error:
        load_images(folder_data(tmp_path), "train", tmp_path / "cache")
    assert "005.png" in str(error.value)


def test_grayscale_folder_three_channels_rejected(tmp_path):
    write_images(tmp_path / "a", 2, mode="L")
    with pytest.raises(ConfigError, match="data.channels"):
        load_images(folder_data(tmp_path, channels=3), "train", tmp_path / "cache")


def test_unreadable_image_rejected(tmp_path):
    write_images(tmp_path / "a", 1)
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(folder_data(tmp_path), "train", tmp_path / "cache")
    assert "broken.png" in str(error.value)


def test_missing_test_split_rejected(tmp_path):
    write_images(tmp_path / "a", 1)
    with pytest.raises(ConfigError, match="data.split"):
        load_images(folder_data(tmp_path), "test", tmp_path / "cache")


def test_corrupt_zip_rejected(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK not really a zip")
    with pytest.raises(ConfigError, match="data.root") as error:
        load_images(folder_data(archive), "train", tmp_path / "cache")
    assert "broken.zip" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Conversions


def test_uint8_round_trip():
    values = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(values)), values)


def test_uint8_clamps_and_rounds():
    converted = to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]))
    assert converted.tolist() == [0, 0, 128, 255, 255]


def test_to_float_range():
    converted = to_float(torch.tensor([0, 255], dtype=torch.uint8))
    assert converted.tolist() == [-1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# BatchStream


def indexed_set(n=10) -> ImageSet:
    """An ImageSet whose image i has every pixel equal to i."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 16, 16).clone()
    labels = torch.zeros(n, dtype=torch.int64)
    return ImageSet(images, labels, 1, "indexed", "train", ("a",), "key")


def batch_ids(batch: torch.Tensor) -> list[int]:
    return to_uint8(batch)[:, 0, 0, 0].tolist()


def test_stream_batches(tmp_path):
    stream = BatchStream(load_images(DIGITS, "train", tmp_path), seed=0, device="cpu")
    batch = stream.next(32)
    assert batch.shape == (32, 1, 16, 16)
    assert batch.dtype == torch.float32
    assert float(batch.min()) >= -1
    assert float(batch.max()) <= 1


def test_stream_epoch_drops_tail():
    stream = BatchStream(indexed_set(10), seed=0, device="cpu")
    first_epoch = [i for _ in range(3) for i in batch_ids(stream.next(3))]
    assert sorted(set(first_epoch)) == sorted(first_epoch)
    assert len(first_epoch) == 9
    assert stream.epoch == 0
    stream.next(3)
    assert stream.epoch == 1
    assert stream.position == 3


def test_stream_seeded():
    first = BatchStream(indexed_set(), seed=3, device="cpu")
    second = BatchStream(indexed_set(), seed=3, device="cpu")
    other = BatchStream(indexed_set(), seed=4, device="cpu")
    ids = [batch_ids(first.next(5)) for _ in range(4)]
    assert ids == [batch_ids(second.next(5)) for _ in range(4)]
    assert ids != [batch_ids(other.next(5)) for _ in range(4)]


@pytest.mark.parametrize("before", [0, 1, 2, 3, 7])
def test_stream_resume_identical(tmp_path, before):
    images = load_images(DIGITS, "train", tmp_path)
    stream = BatchStream(images, seed=11, device="cpu")
    for _ in range(before):
        stream.next(400)  # three batches per epoch, so resumes land inside and across epochs
    state = stream.state_dict()
    expected = [stream.next(400) for _ in range(5)]
    resumed = BatchStream(images, seed=0, device="cpu")
    resumed.load_state_dict(state)
    for batch, reference in zip([resumed.next(400) for _ in range(5)], expected, strict=True):
        assert torch.equal(batch, reference)


def test_stream_state_plain():
    stream = BatchStream(indexed_set(), seed=0, device="cpu")
    stream.next(4)
    for value in stream.state_dict().values():
        assert isinstance(value, int | str | torch.Tensor)
