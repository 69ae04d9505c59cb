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


def tiny_run(d: Path, stories_dir: Path, assets: Path, **settings) -> Path:
    """A real `sasq run` folder in a few seconds under d: stories260K, a slice of WikiText-2 valid
    to train on and of test to report, W4A8, KL; `settings` override ExperimentConfig fields.
    Returns the run folder (d/res)."""
    from sasq.experiment import ExperimentConfig, run_experiment
    wt = assets / "wikitext-2"
    (d / "train.txt").write_text((wt / "tokens-v1" / "valid.txt").read_text()[:12_000])
    (d / "eval.txt").write_text((wt / "raw-v1" / "test.joined.txt").read_text()[:3_000])
    cfg = dict(model=str(stories_dir), train=str(d / "train.txt"), eval=str(d / "eval.txt"),
               bits=("W4A8",), objectives=("kl",), steps=4, seqlen=32, batch=1, calib_windows=2,
               val_windows=2, eval_windows=3, own_windows=2, out=str(d / "res"), progress=False)
    run_experiment(ExperimentConfig(**{**cfg, **settings}), log=lambda *a: None)
    return d / "res"
