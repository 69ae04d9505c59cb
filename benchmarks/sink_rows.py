"""How many leading positions need their own static scales (QuantPlan.sink_tokens), and how that
compares with PrefixQuant's alternative (a fixed prefix whose KV cache is computed once in FP32).

Calibration and evaluation both come from WikiText-2 *valid* (tokens-v1/valid.txt): the first
`--calib` windows calibrate, the next `--eval` windows are scored (never the test split: this
chooses a default). Activations only (FP32 weights), static A8 per-tensor, absmax calibration
(the max over calibration windows), so the sink rows are the only change between rows.

PrefixQuant-style rows: every window is preceded by a fixed prefix (BOS, or a newline token)
whose keys and values are computed by the FP32 model once and prepended to the KV cache of the
quantized model; the prefix takes the attention sink, so no window position carries the massive
activation. Their reference is FP32 with the same prefix.

    python benchmarks/sink_rows.py                # SmolLM2-135M (cached by benchmarks/assets.py)
    python benchmarks/sink_rows.py --model DIR --sinks 0,1,2,4,8
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sasq  # noqa: E402
from sasq.data import cut_windows, read_text, tokenize_corpus  # noqa: E402
from sasq.eval import Reference, perplexity  # noqa: E402
from sasq.model import KVCache, Observer  # noqa: E402

SMOLLM2 = Path.home() / ".cache" / "sasq" / "smollm2" / "hf"
VALID = ROOT.parent / "shared" / "assets" / "wikitext-2" / "tokens-v1" / "valid.txt"


class Prefixed:
    """A model (or QuantModel) whose every window runs after a fixed FP32 prefix cache."""

    def __init__(self, model, cache: KVCache, n_prefix: int):
        self.model, self.cache, self.n = model, cache, n_prefix
        self.lm_head, self.config = model.lm_head, model.config

    def forward(self, ids, return_hidden=False):
        out = []
        for row in ids:  # the prefix cache has batch 1
            c = copy.deepcopy(self.cache)
            out.append(self.model.forward(row[None], cache=c, return_hidden=return_hidden)[0])
        return np.stack(out)


def prefix_cache(fp32, prefix):
    c = KVCache(fp32.config.num_hidden_layers)
    fp32.forward(np.asarray([prefix]), cache=c, return_hidden=True)
    return c


class _Absmax(Observer):
    def __init__(self):
        self.amax = {}

    def observe(self, layer, site, x, pos):
        self.amax[(layer, site)] = max(self.amax.get((layer, site), 0.0), float(np.abs(x).max()))


def absmax_calibrate_prefixed(q, fp32, cache, windows):
    """Per-tensor absmax scales from the FP32 model run after the prefix (what it will see)."""
    obs = _Absmax()
    for w in windows:
        fp32.forward(w[None], hook=obs, cache=copy.deepcopy(cache), return_hidden=True)
    for (layer, name), site in q.sites.items():
        site.set_value(site.scale_key, obs.amax[(layer, name)] / site.qmax)
    q.sync()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SMOLLM2))
    ap.add_argument("--text", default=str(VALID))
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--eval", type=int, default=8)
    ap.add_argument("--sinks", default="0,1,2,4,8")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    sasq.set_num_threads(a.threads)
    model = sasq.load(a.model)
    ids = tokenize_corpus(model.tokenizer, read_text(a.text))
    wins = cut_windows(ids, a.seqlen, a.calib + a.eval)
    calib, ev = wins[:a.calib], wins[a.calib:]
    t0 = time.perf_counter()
    ref = Reference.compute(model, ev, a.seqlen, progress=False)
    fp = perplexity(model, ev, a.seqlen, progress=False, reference=ref)
    print(f"{a.model}: {len(calib)} calibration + {len(ev)} eval windows x {a.seqlen} of {Path(a.text).name}; "
          f"A{a.bits} static per-tensor, FP32 weights, absmax calibration")
    print(f"{'rows':<34} {'PPL':>8} {'KL':>8} {'top-1':>7}")
    print(f"{'FP32':<34} {fp.ppl:>8.3f} {0:>8.4f} {100:>6.1f}%")
    for k in (int(s) for s in a.sinks.split(",")):
        q = sasq.quantize(model, sasq.QuantPlan(w_bits=None, a_bits=a.bits, sink_tokens=k))
        sasq.calibrate(q, calib, method="absmax", progress=False)
        r = perplexity(q, ev, a.seqlen, progress=False, reference=ref)
        print(f"{f'sink_tokens={k}':<34} {r.ppl:>8.3f} {r.kl:>8.4f} {100 * r.top1:>6.1f}%")
    tok = model.tokenizer
    for name, prefix in (("BOS", [model.config.bos_token_id or 0]),
                         ("'\\n'", tok.encode("\n")[-1:] if tok is not None else None)):
        if prefix is None or prefix[0] is None:
            continue
        cache = prefix_cache(model, prefix)
        fpp = Prefixed(model, cache, len(prefix))
        ref_p = Reference.compute(fpp, ev, a.seqlen, progress=False)
        q = sasq.quantize(model, sasq.QuantPlan(w_bits=None, a_bits=a.bits))
        absmax_calibrate_prefixed(q, model, cache, calib)
        r_fp = perplexity(fpp, ev, a.seqlen, progress=False, reference=ref_p)
        r = perplexity(Prefixed(q, cache, len(prefix)), ev, a.seqlen, progress=False, reference=ref_p)
        print(f"{f'prefix {name} (FP32 KV), no sink rows':<34} {r.ppl:>8.3f} {r.kl:>8.4f} "
              f"{100 * r.top1:>6.1f}%   (FP32 with the prefix: PPL {r_fp.ppl:.3f})")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
