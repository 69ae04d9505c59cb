"""Per-site activation outlier statistics: does static per-tensor INT8 collapse on this model?

    python benchmarks/outliers.py [MODEL] [--windows 4] [--seqlen 512] [--json out.json]

MODEL is an HF dir or .gguf (default: SmolLM2 from benchmarks/assets.py's cache). For every decoder
layer and linear-input site (attn_in, o_in, mlp_in, down_in) a hook records each channel's absmax
over all tokens of a few WikiText-2 windows. ratio = max channel absmax / median channel absmax:
a per-tensor scale set by the largest channel leaves the median channel about 127 / ratio integer
levels at 8 bits (fewer than ~10 levels means it is mostly rounded to zero).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sasq.model import Observer  # noqa: E402

SITES = ("attn_in", "o_in", "mlp_in", "down_in")


class AbsmaxHook(Observer):
    """Running per-channel absmax of each (layer, site); passes activations through unchanged."""

    def __init__(self, sites=SITES):
        self.sites, self.absmax = set(sites), {}

    def observe(self, layer, site, x, pos):
        if site in self.sites:
            a = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)  # (C,)
            old = self.absmax.get((layer, site))
            self.absmax[(layer, site)] = a if old is None else np.maximum(old, a)


def stats(absmax: dict, n_layers: int) -> list[dict]:
    rows = []
    for i in range(n_layers):
        row = {"layer": i}
        for s in SITES:
            a = absmax[(i, s)]
            med = float(np.median(a))
            row[s] = {"absmax": float(a.max()), "median": med, "ratio": float(a.max() / max(med, 1e-30)),
                      "top_channel": int(a.argmax())}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="HF dir or .gguf (default: cached SmolLM2 HF dir)")
    p.add_argument("--text", default=str(ROOT.parent / "shared/assets/wikitext-2/raw-v1/test.joined.txt"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", help="also write the statistics here")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)

    import sasq
    from sasq.data import cut_windows, tokenize_corpus
    if args.model is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from assets import smollm2_available, smollm2_paths
        if not smollm2_available():
            p.error("SmolLM2 not cached: run `python benchmarks/assets.py smollm2` or give MODEL")
        args.model = str(smollm2_paths()[1])
    model = sasq.load(args.model)
    ids = tokenize_corpus(model.tokenizer, Path(args.text).read_text())
    wins = cut_windows(ids, args.seqlen)
    # evenly spread windows over the text, not only its beginning
    pick = np.linspace(0, len(wins) - 1, num=min(args.windows, len(wins))).round().astype(int)
    hook = AbsmaxHook()
    from tqdm import tqdm
    t0 = time.time()
    for w in tqdm(pick, desc="windows", disable=args.quiet):
        model.forward(wins[w:w + 1], hook=hook, return_hidden=True)
    rows = stats(hook.absmax, model.config.num_hidden_layers)

    print(f"# {args.model}: {len(pick)} windows x {args.seqlen} tokens (window indices {pick.tolist()}), "
          f"{time.time() - t0:.0f} s")
    print("# ratio = max channel absmax / median channel absmax (absmax = largest |x| of any channel)")
    print(f"{'layer':>5} " + " ".join(f"{s + ' ratio':>14} {'absmax':>8}" for s in SITES))
    for r in rows:
        print(f"{r['layer']:>5} " + " ".join(f"{r[s]['ratio']:>14.1f} {r[s]['absmax']:>8.2f}" for s in SITES))
    worst = {s: max(rows, key=lambda r: r[s]["ratio"]) for s in SITES}
    print("# worst layer per site: " + ", ".join(
        f"{s} {w[s]['ratio']:.0f}x (layer {w['layer']}, channel {w[s]['top_channel']}, "
        f"~{127 / w[s]['ratio']:.1f} INT8 levels left for the median channel)" for s, w in worst.items()))
    print("# median over layers:   " + ", ".join(
        f"{s} {np.median([r[s]['ratio'] for r in rows]):.1f}x" for s in SITES))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "seqlen": args.seqlen,
                                               "windows": pick.tolist(), "layers": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
