"""Fixtures shared by several test files."""

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Datasets and metrics: one cache folder per machine, so the CIFAR-10 extraction and decoding
# and the classifier extractor's training happen once, not once per test session.

CIFAR10_ZIP = Path(
    os.environ.get("ANAS_CIFAR10_ZIP", REPOSITORY.parent / "shared" / "data" / "cifar10-jpeg.zip")
)


@pytest.fixture(scope="session")
def anas_cache_dir() -> Path:
    """Return the cache folder of the tests: $ANAS_CACHE_DIR if set, else ~/.cache/anas."""
    folder = Path(os.environ.get("ANAS_CACHE_DIR", Path.home() / ".cache" / "anas"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def cifar10_zip() -> Path:
    """Return the zip of the 60,000 CIFAR-10 JPEGs ($ANAS_CIFAR10_ZIP overrides the path)."""
    if not CIFAR10_ZIP.is_file():
        pytest.skip(f"CIFAR-10 zip not found at {CIFAR10_ZIP}; set ANAS_CIFAR10_ZIP")
    return CIFAR10_ZIP


@pytest.fixture(scope="session")
def cifar10_root(cifar10_zip: Path, anas_cache_dir: Path) -> Path:
    """Return the CIFAR-10 image folder (train/ and test/) extracted into the test cache."""
    from anas.cache import extract_zip

    extracted = extract_zip(cifar10_zip, anas_cache_dir)
    folders = [path.parent for path in extracted.glob("*/train")] + [
        path.parent for path in extracted.glob("train")
    ]
    assert len(folders) == 1, f"expected one train/ folder in {extracted}, found {folders}"
    return folders[0]
