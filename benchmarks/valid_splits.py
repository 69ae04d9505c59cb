"""The held-out protocol of the lever benchmarks (down_smoothing.py, kv_cache_forms.py): a model
and WikiText-2 *valid* only (never the reported test split), cut into training (first 80 %),
held-out selection (next 10 %) and the windows the figures are read on (last 10 %)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sasq  # noqa: E402
from sasq.data import cut_windows, read_text, tokenize_corpus  # noqa: E402
from sasq.eval import Reference  # noqa: E402

VALID = ROOT.parent / "shared" / "assets" / "wikitext-2" / "tokens-v1" / "valid.txt"


@dataclass
class Splits:
    model: object
    train: np.ndarray       # first 80 % of valid: calibration and training
    heldout: np.ndarray     # next 10 %: start choice and early stopping
    calib: np.ndarray       # (8, seqlen) from train
    report: Reference       # 32 windows of the last 10 %, with the FP32 hidden states


def setup(doc: str, argv=None, **options) -> tuple[argparse.Namespace, Splits]:
    """Parse the common flags plus `options` (name=(default, help), string valued), then load.
    Returns (args, splits)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: bundled stories260K)")
    ap.add_argument("--steps", type=int, default=100, help="KL training steps (0: none)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    for name, (default, text) in options.items():
        ap.add_argument(f"--{name}", default=default, help=text)
    a = ap.parse_args(argv)
    return a, load(a)


def load(a) -> Splits:
    if a.threads:
        sasq.set_num_threads(a.threads)
    m = sasq.load(a.model)
    ids = tokenize_corpus(m.tokenizer, read_text(VALID))
    n = len(ids)
    tr, ho, te = ids[:int(.8 * n)], ids[int(.8 * n):int(.9 * n)], ids[int(.9 * n):]
    return Splits(m, tr, ho, cut_windows(tr, a.seqlen)[:8],
                  Reference.compute(m, te, a.seqlen, 32, 4, False))
