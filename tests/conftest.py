from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def assets() -> Path:
    """../shared/assets beside the checkout; tests that need it skip with a clear reason."""
    if not (ASSETS / "MANIFEST.md").exists():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


@pytest.fixture(scope="session")
def stories_dir(assets) -> Path:
    return assets / "stories260K" / "hf"


@pytest.fixture(scope="session")
def wikitext_test(assets) -> Path:
    return assets / "wikitext-2" / "raw-v1" / "test.joined.txt"
