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


# ---------------------------------------------------------------------------------------------
# A supernet at the smallest sizes, for tests of derivation, drawings and reports.


@pytest.fixture(scope="session")
def tiny_search():
    """Return a function that builds a Search of 16 px images, widths 4 and batch 2 from a seed."""
    from anas.search import Search, SearchSettings

    def build(seed: int = 0) -> Search:
        settings = SearchSettings(
            latent_dim=6,
            g_channels=4,
            d_channels=4,
            img_size=16,
            img_channels=3,
            batch_size=2,
            n_critic=1,
            iterations=4,
            loss="hinge",
            arch_lr=3e-4,
            arch_betas=(0.5, 0.999),
            arch_weight_decay=1e-3,
            g_lr=2e-4,
            d_lr=2e-4,
            betas=(0.0, 0.9),
            gumbel=False,
            tau_max=5.0,
            tau_min=0.1,
        )
        return Search(settings, "cpu", seed)

    return build


@pytest.fixture(scope="module")
def mixed_search(tiny_search):
    """Return a tiny Search with random architecture weights, so that its derived cells, the
    discriminator's above all, mix many operations."""
    import torch

    search = tiny_search()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [*search.G.alpha.values(), *search.D.beta.values()]:
            p.copy_(3 * torch.randn(p.shape, generator=generator))
    return search
