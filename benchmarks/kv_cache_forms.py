"""KV-cache quantization forms side by side, the cache alone quantized (weights and activations
float): QuaRot's dynamic per-(token, head) asymmetric grid, with and without rotation + R3, and
static sink-aware scales, calibrated and then trained by SASQ (KL steps; the cache scales are
ordinary parameters).

Everything comes from WikiText-2 *valid* (never the reported test split): calibration and
training from the first 80 %, held-out KL for early stopping from the next 10 %, the figures on
32 windows of the last 10 %.

    python benchmarks/kv_cache_forms.py                       # stories260K, KV4 and KV3
    python benchmarks/kv_cache_forms.py --model ~/.cache/sasq/smollm2/hf --bits 4 --steps 40

Measured 2026-11-30 on stories260K (head_dim 8; FP32 253.51 on these windows), KL to FP32:
KV4 dynamic per-head 0.656, with rotation + R3 0.592; static per-channel +sink4 0.732 -> 0.530
trained (100 steps: below the dynamic grid); rotation + R3 static per-tensor 1.344 -> 1.002,
per-channel 1.075 -> 0.865. KV3: dynamic 1.275, static per-channel 1.594 -> 0.999 trained.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sasq  # noqa: E402
import valid_splits  # noqa: E402
from sasq.plan import QuantPlan  # noqa: E402
from sasq.train import train_scales  # noqa: E402


def forms(b: int) -> dict:
    """name -> (plan, trained?) for KV `b` bits."""
    rot = dict(rotate=True, rotate_qk=True)
    return {
        "dynamic per-head asym": (QuantPlan(None, None, kv_bits=b, kv_mode="dynamic"), False),
        "rot+R3 dynamic per-head asym": (QuantPlan(None, None, kv_bits=b, kv_mode="dynamic", **rot), False),
        "static per-channel +sink4": (QuantPlan(None, None, kv_bits=b, sink_tokens=4,
                                                granularity="channel"), True),
        "rot+R3 static per-tensor +sink4": (QuantPlan(None, None, kv_bits=b, sink_tokens=4, **rot), True),
        "rot+R3 static per-channel +sink4": (QuantPlan(None, None, kv_bits=b, sink_tokens=4,
                                                       granularity="channel", **rot), True),
    }


def main(argv=None) -> int:
    a, d = valid_splits.setup(__doc__, argv, bits=("4,3", "comma-separated KV bit widths"))
    m, tr, ho, calib, ref = d.model, d.train, d.heldout, d.calib, d.report

    def score(q):
        r = sasq.perplexity(q, ref.windows, a.seqlen, batch_size=4, progress=False, reference=ref)
        return f"PPL {r.ppl:.3f} KL {r.kl:.5f} top-1 {100 * r.top1:.1f}%"

    print(f"FP32 {score(m)} ({ref.windows.shape[0]} x {a.seqlen})")
    for b in (int(x) for x in a.bits.split(",")):
        for name, (plan, train) in forms(b).items():
            t = time.perf_counter()
            q = sasq.quantize(m, plan)
            if q.needs_calibration:
                sasq.calibrate(q, calib, a.seqlen, progress=False)
            line = f"KV{b} {name}: {score(q)}"
            if train and a.steps:
                r = train_scales(q, tr, steps=a.steps, lr=0.03, seqlen=a.seqlen, batch=4,
                                 objective="kl", val_ids=ho, val_windows=24, progress=False, seed=0)
                line += f" -> trained {score(q)} (best step {r.best_step})"
            print(f"{line} ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
