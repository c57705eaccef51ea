"""FID, IS and KID with the offline classifier on real digits and CIFAR-10 images.

The classifier and the decoded datasets are cached in the test cache folder (see conftest), so
only the first run on a machine trains the classifiers (digits: seconds, CIFAR-10: about a
minute on two cores).
"""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import gaussian_blur

from anas.data import BatchStream, load_images
from anas.errors import ConfigError
from anas.extractors import (
    CLASSIFIER_FIDELITY_NAME,
    EXTRACTORS,
    ClassifierSettings,
    classifier_accuracy,
    inception_download_path,
    train_classifier,
)
from anas.metrics import (
    Evaluator,
    MetricSettings,
    Protocol,
    compare_images,
    extract_features,
    save_grid,
)

DIGITS = {"name": "digits", "root": None, "img_size": 16, "channels": 1}
BLUR_SIGMAS = (0.5, 1.0, 2.0)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return gaussian_blur(images, kernel_size=[9, 9], sigma=[sigma, sigma])


def uniform_noise(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, like.shape, dtype=torch.uint8, generator=generator)


def shuffled(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Return `n` images in random order: image folders list them class by class."""
    generator = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=generator)[:n]]


# ---------------------------------------------------------------------------------------------
# Reference FIDs on digits


@pytest.fixture(scope="module")
def digits_sets(anas_cache_dir):
    train = load_images(DIGITS, "train", anas_cache_dir)
    test = load_images(DIGITS, "test", anas_cache_dir)
    return train.images, test.images


def digits_fid(reference, images, cache_dir, metrics=("fid",)):
    return compare_images(reference, images, DIGITS, "classifier", cache_dir, "cpu", metrics)


def test_digits_classifier_accurate(anas_cache_dir):
    weights = EXTRACTORS.get("classifier")(DIGITS, anas_cache_dir, torch.device("cpu"), None)
    extractor = weights.build(["logits"], "cpu")
    test = load_images(DIGITS, "test", anas_cache_dir)
    assert classifier_accuracy(extractor.net, test, "cpu") > 0.95


def test_classifier_training_deterministic(anas_cache_dir):
    train = load_images(DIGITS, "train", anas_cache_dir)
    settings = ClassifierSettings(max_steps=5)
    first, _ = train_classifier(train, settings, "cpu")
    second, _ = train_classifier(train, settings, "cpu")
    other, _ = train_classifier(train, replace(settings, seed=1), "cpu")
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_digits_fid_self_zero(digits_sets, anas_cache_dir):
    train, _ = digits_sets
    assert abs(digits_fid(train, train, anas_cache_dir)["fid"]) < 1e-6


def test_digits_fid_test_small(digits_sets, anas_cache_dir):
    train, test = digits_sets
    fid_test = digits_fid(train, test, anas_cache_dir)["fid"]
    fid_noise = digits_fid(train, uniform_noise(test), anas_cache_dir)["fid"]
    assert fid_test < 0.05 * fid_noise
    assert fid_noise > 10


def test_digits_fid_blur_rises(digits_sets, anas_cache_dir):
    train, _ = digits_sets
    fids = [digits_fid(train, blur(train, sigma), anas_cache_dir)["fid"] for sigma in BLUR_SIGMAS]
    assert fids[0] > 1e-3
    assert fids[0] < fids[1] < fids[2]


def test_digits_fid_accepts_float(digits_sets, anas_cache_dir):
    train, test = digits_sets
    from_uint8 = digits_fid(train, test, anas_cache_dir)["fid"]
    from_float = digits_fid(train, test.float() / 127.5 - 1, anas_cache_dir)["fid"]
    assert from_float == pytest.approx(from_uint8, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Reference FIDs and IS on real CIFAR-10 JPEGs: 2,000 random train images against others


@pytest.fixture(scope="module")
def cifar(cifar10_root, anas_cache_dir):
    data = {"name": "cifar10", "root": str(cifar10_root), "img_size": 32, "channels": 3}
    train = shuffled(load_images(data, "train", anas_cache_dir).images, 2000)
    test = shuffled(load_images(data, "test", anas_cache_dir).images, 2000)
    return data, train, test


def cifar_metrics(cifar, images, cache_dir, metrics=("fid",)):
    data, train, _ = cifar
    return compare_images(train, images, data, "classifier", cache_dir, "cpu", metrics)


def test_cifar_fid_self_zero(cifar, anas_cache_dir):
    assert abs(cifar_metrics(cifar, cifar[1], anas_cache_dir)["fid"]) < 1e-6


def test_cifar_fid_test_small(cifar, anas_cache_dir):
    _, train, test = cifar
    fid_test = cifar_metrics(cifar, test, anas_cache_dir)["fid"]
    fid_noise = cifar_metrics(cifar, uniform_noise(test), anas_cache_dir)["fid"]
    assert fid_test < 0.1 * fid_noise
    assert fid_noise > 10


def test_cifar_fid_blur_rises(cifar, anas_cache_dir):
    train = cifar[1]
    fids = [cifar_metrics(cifar, blur(train, s), anas_cache_dir)["fid"] for s in BLUR_SIGMAS]
    assert fids[0] > 1e-3
    assert fids[0] < fids[1] < fids[2]


def test_cifar_is_real_above_noise(cifar, anas_cache_dir):
    _, _, test = cifar
    real = cifar_metrics(cifar, test, anas_cache_dir, ("is",))["is"]
    noise = cifar_metrics(cifar, uniform_noise(test), anas_cache_dir, ("is",))["is"]
    assert real > noise + 0.5


# ---------------------------------------------------------------------------------------------
# Agreement with torch-fidelity's own calculate_metrics


class TensorImages(Dataset):
    """uint8 images as torch-fidelity reads a dataset: (3, H, W) per item."""

    def __init__(self, images: torch.Tensor):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def test_matches_calculate_metrics(digits_sets, anas_cache_dir):
    train, test = digits_sets
    settings = MetricSettings(kid_subsets=20, kid_subset_size=300)
    ours = compare_images(
        train,
        test,
        DIGITS,
        "classifier",
        anas_cache_dir,
        "cpu",
        ("fid", "is", "kid"),
        None,
        settings,
    )
    weights = EXTRACTORS.get("classifier")(DIGITS, anas_cache_dir, torch.device("cpu"), None)
    theirs = torch_fidelity.calculate_metrics(
        input1=TensorImages(test),
        input2=TensorImages(train),
        feature_extractor=CLASSIFIER_FIDELITY_NAME,
        feature_extractor_weights_path=str(weights.path),
        fid=True,
        isc=True,
        kid=True,
        kid_subsets=20,
        kid_subset_size=300,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_FID], rel=1e-6)
    assert ours["is"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-6)
    assert ours["kid"] == pytest.approx(theirs[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Evaluator: sampling function, protocol and the reference-statistics cache


def test_protocol_tag():
    protocol = Protocol("classifier", "digits", "train", 16, 1000, 1437)
    assert protocol.tag == "classifier-digits-train-r1437-g1000-16px"
    assert protocol.to_dict()["n_real"] == 1437
    assert protocol.to_dict()["tag"] == protocol.tag


def test_evaluator_matches_compare(digits_sets, anas_cache_dir):
    train, test = digits_sets
    evaluator = Evaluator(DIGITS, "classifier", "train", None, anas_cache_dir, "cpu")
    stream = iter(test.split(64))
    result = evaluator.evaluate(lambda k: next(stream)[:k], len(test), metrics=("fid", "is"))
    expected = digits_fid(train, test, anas_cache_dir, ("fid", "is"))
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert result["is"] == pytest.approx(expected["is"], rel=1e-6)
    assert result["protocol"]["tag"] == "classifier-digits-train-r1437-g360-16px"


def test_evaluator_all_metrics(anas_cache_dir):
    evaluator = Evaluator(DIGITS, "classifier", "train", None, anas_cache_dir, "cpu")
    stream = BatchStream(load_images(DIGITS, "test", anas_cache_dir), seed=0, device="cpu")
    result = evaluator.evaluate(stream.next, 1000)
    assert set(result) == {"fid", "is", "is_std", "kid", "kid_std", "protocol"}
    assert result["is"] > 5
    assert abs(result["kid"]) < 0.05


def test_evaluator_noise_worse(anas_cache_dir):
    evaluator = Evaluator(DIGITS, "classifier", "train", 1000, anas_cache_dir, "cpu")
    stream = BatchStream(load_images(DIGITS, "test", anas_cache_dir), seed=0, device="cpu")
    real = evaluator.evaluate(stream.next, 300, metrics=("fid",))["fid"]
    noise = evaluator.evaluate(lambda k: torch.rand(k, 1, 16, 16) * 2 - 1, 300, ("fid",))["fid"]
    assert real < 0.1 * noise


def test_evaluator_n_real_subset(anas_cache_dir):
    evaluator = Evaluator(DIGITS, "classifier", "train", 500, anas_cache_dir, "cpu")
    reference = evaluator.reference(need_features=True)
    assert reference["features"].shape == (500, 64)
    assert reference["mu"].shape == (64,)
    assert evaluator.protocol(10).tag == "classifier-digits-train-r500-g10-16px"


def test_reference_cache_hit(anas_cache_dir, caplog):
    first = Evaluator(DIGITS, "classifier", "train", 700, anas_cache_dir, "cpu")
    first.reference_path().unlink(missing_ok=True)
    noise = torch.Generator().manual_seed(1)

    def sample(k):
        return torch.rand(k, 1, 16, 16, generator=noise) * 2 - 1

    first_fid = first.evaluate(sample, 100, ("fid",))["fid"]
    assert first.reference_cache_hit is False
    second = Evaluator(DIGITS, "classifier", "train", 700, anas_cache_dir, "cpu")
    noise.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="anas.metrics"):
        second_fid = second.evaluate(sample, 100, ("fid",))["fid"]
    assert second.reference_cache_hit is True
    assert "cache hit" in caplog.text
    assert second_fid == pytest.approx(first_fid, rel=1e-9)


def test_sample_shape_checked(anas_cache_dir):
    evaluator = Evaluator(DIGITS, "classifier", "train", None, anas_cache_dir, "cpu")
    with pytest.raises(ValueError, match="sample"):
        evaluator.evaluate(lambda k: torch.zeros(k, 3, 16, 16), 20, ("fid",))


# ---------------------------------------------------------------------------------------------
# Too few samples for a metric


@pytest.mark.parametrize(
    ("n_real", "n_generated", "metrics", "key", "numbers"),
    [
        (None, 500, ("kid",), "metrics.n_generated", ("500", "1000")),
        (800, 1000, ("kid",), "metrics.n_real", ("800", "1000")),
        (None, 1, ("fid",), "metrics.n_generated", ("1",)),
        (None, 9, ("is",), "metrics.n_generated", ("9", "10")),
    ],
)
def test_too_few_samples(anas_cache_dir, n_real, n_generated, metrics, key, numbers):
    evaluator = Evaluator(DIGITS, "classifier", "train", n_real, anas_cache_dir, "cpu")
    with pytest.raises(ConfigError, match=key) as error:
        evaluator.evaluate(lambda k: torch.zeros(k, 1, 16, 16), n_generated, metrics)
    for number in numbers:
        assert number in str(error.value)


def test_n_real_above_split(anas_cache_dir):
    with pytest.raises(ConfigError, match="metrics.n_real") as error:
        Evaluator(DIGITS, "classifier", "train", 2000, anas_cache_dir, "cpu")
    assert "1437" in str(error.value)


def test_n_real_one(anas_cache_dir):
    with pytest.raises(ConfigError, match="metrics.n_real"):
        Evaluator(DIGITS, "classifier", "train", 1, anas_cache_dir, "cpu")


def test_unknown_extractor(anas_cache_dir):
    with pytest.raises(ConfigError, match="metrics.extractor"):
        Evaluator(DIGITS, "vgg", "train", None, anas_cache_dir, "cpu")


# ---------------------------------------------------------------------------------------------
# Inception-v3 weights from a local file


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Write a randomly initialised state dict of torch-fidelity's Inception-v3 network."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    cls = module.FeatureExtractorInceptionV3
    patch = pytest.MonkeyPatch()
    # the constructor always loads weights, so both loading steps are skipped while building it
    patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: {})
    patch.setattr(cls, "load_state_dict", lambda self, state, *args, **kwargs: None)
    try:
        network = cls("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_local_weights(inception_file, anas_cache_dir):
    evaluator = Evaluator(
        DIGITS, "inception-v3-compat", "train", 4, anas_cache_dir, "cpu", str(inception_file)
    )
    assert evaluator.weights.path == inception_file
    real = load_images(DIGITS, "train", anas_cache_dir).images[:4]
    features = extract_features(evaluator.extractor, [real], evaluator.layers, 4)
    assert features["fid"].shape == (4, 2048)
    assert features["is"].shape == (4, 1008)
    assert bool(torch.isfinite(features["fid"]).all())
    result = evaluator.evaluate(lambda k: torch.rand(k, 1, 16, 16) * 2 - 1, 4, ("fid",))
    assert np.isfinite(result["fid"])
    assert result["protocol"]["extractor"] == "inception-v3-compat"


def test_inception_missing_file(tmp_path):
    missing = tmp_path / "none.pth"
    with pytest.raises(ConfigError, match="metrics.inception_weights") as error:
        Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu", str(missing))
    assert str(missing) in str(error.value)
    assert "https://github.com/toshas/torch-fidelity/releases" in str(error.value)


def test_inception_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="metrics.inception_weights") as error:
        Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu")
    assert str(inception_download_path()) in str(error.value)
    assert "https://github.com/toshas/torch-fidelity/releases" in str(error.value)


def test_inception_download_path_used(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    inception_download_path().parent.mkdir(parents=True)
    inception_download_path().symlink_to(inception_file)
    evaluator = Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu")
    assert evaluator.weights.path == inception_download_path()


def test_inception_corrupt_file(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="metrics.inception_weights"):
        Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu", str(broken))


def test_inception_pickled_object_rejected(tmp_path):
    # weights_only loading rejects arbitrary pickled objects before torch-fidelity unpickles
    path = tmp_path / "object.pth"
    torch.save({"fc.weight": torch.zeros(1), "extra": logging.getLogger("x")}, path)
    with pytest.raises(ConfigError, match="metrics.inception_weights"):
        Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu", str(path))


def test_inception_wrong_network(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match="metrics.inception_weights") as error:
        Evaluator(DIGITS, "inception-v3-compat", "train", 4, tmp_path, "cpu", str(path))
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------------
# Sample grids


def test_save_grid(tmp_path):
    images = torch.linspace(-1, 1, 16 * 16 * 16).view(16, 1, 16, 16)
    path = tmp_path / "grid.png"
    save_grid(images, path, nrow=4)
    with Image.open(path) as grid:
        assert grid.format == "PNG"
        assert grid.size == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2)  # torchvision pads by 2 pixels
    assert list(tmp_path.iterdir()) == [path]
