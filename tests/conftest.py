import importlib.util
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


@pytest.fixture(scope="session")
def smollm2():
    """(gguf path, converted HF dir) of SmolLM2-135M when benchmarks/assets.py cached it."""
    spec = importlib.util.spec_from_file_location("sasq_bench_assets", ROOT / "benchmarks" / "assets.py")
    a = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(a)
    gguf, hf = a.smollm2_paths()
    if not a.smollm2_available():
        pytest.skip(f"SmolLM2 not cached at {gguf.parent}; run `python benchmarks/assets.py smollm2`")
    return gguf, hf
