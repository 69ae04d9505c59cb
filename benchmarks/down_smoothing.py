"""A lever measured, not adopted: SmoothQuant-style factors on down_proj's input applied *before*
the online R4 (SmoothRot's idea: scale the SwiGLU product's channels into up_proj's rows and
down_proj's columns, then rotate), for static per-tensor activations on the rotated model.

The factors are a pure fold on the FP model (sasq.transforms.fold_scales at the down_in site; the
SwiGLU product is the same before and after R1/R2, so its statistics are taken on the unrotated
model), then sasq.rotate.rotate_model; the result is an ordinary rotated model (FP32 logits
unchanged) that any rotated plan takes as it is.

Everything comes from WikiText-2 *valid* (never the reported test split): calibration and
training from the first 80 %, held-out KL for the start choice and early stopping from the next
10 %, and the figures on 32 x 512 windows of the last 10 %. Rows: W8A8 static per-tensor +sink4
on the rotated model (rotation + GPTQ with searched scales: the catalogue's sasq_rot_gptq plan),
SASQ's start choice, then `--steps` KL steps; dynamic per-token (not rotated) for reference.

    python benchmarks/down_smoothing.py                    # stories260K, alpha 0.3, 100 steps
    python benchmarks/down_smoothing.py --alpha 0.3,0.5 --steps 0

Measured 2026-11-30 (stories260K, defaults): dynamic per-token 0.00410; rotated: start 0.00427,
trained 0.00416; smoothing 0.3 then rotated: start 0.00420, trained 0.00425. A first probe that
took the weight maxima after R1 instead gave 0.00421 -> 0.00404. The lever moves KL by a few
per cent either way: not adopted.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sasq  # noqa: E402
import valid_splits  # noqa: E402
from sasq.eval import Reference  # noqa: E402
from sasq.methods import make_plan  # noqa: E402
from sasq.model import Observer  # noqa: E402
from sasq.rotate import rotate_model  # noqa: E402
from sasq.start import choose_start  # noqa: E402
from sasq.train import train_scales  # noqa: E402
from sasq.transforms import consumer_column_absmax, fold_scales, smoothing_factors  # noqa: E402

SINK = 4


class DownAbsmax(Observer):
    """Per layer, max |x| per channel of down_proj's input over positions >= SINK (the sink rows
    have their own scales)."""

    def __init__(self):
        self.a = {}

    def observe(self, layer, site, x, pos):
        if site == "down_in":
            m = np.abs(x[:, SINK:]).max(axis=(0, 1)).astype(np.float64)
            self.a[layer] = np.maximum(self.a.get(layer, 0.0), m)


def smoothed_rotated(model, calib, alpha: float, seed: int = 0):
    """rotate_model(model with down_in smoothing factors folded in): same FP function."""
    obs = DownAbsmax()
    for i in range(0, len(calib), 4):
        model.forward(calib[i:i + 4], hook=obs)
    folds = {}
    for i, a in obs.a.items():
        f = smoothing_factors(a, consumer_column_absmax(model, i, "down_in"), alpha)
        folds[f"layers.{i}.down_in"] = (f / np.exp(np.log(f).mean())).astype(model.dtype)
    return rotate_model(fold_scales(model, folds), seed=seed)


def main(argv=None) -> int:
    a, d = valid_splits.setup(__doc__, argv, alpha=("0.3", "comma-separated SmoothQuant alphas"))
    m, tr, ho, calib, ref = d.model, d.train, d.heldout, d.calib, d.report
    heldout = Reference.compute(m, ho, a.seqlen, 24, 4, False)
    plan = make_plan("sasq_rot_gptq", 8, 8)

    def kl(q):
        return sasq.perplexity(q, ref.windows, a.seqlen, batch_size=4, progress=False,
                               reference=ref).kl

    print(f"{m.config.num_hidden_layers} layers; calibration 8 x {a.seqlen}, held-out 24, "
          f"reported 32 windows of valid's last 10 %")
    print(f"dynamic per-token W8A8 (not rotated): KL {kl(sasq.quantize(m, sasq.QuantPlan(8, 8, mode='dynamic'))):.5f}")
    cases = [("rotated", rotate_model(m, seed=plan.rotate_seed))]
    cases += [(f"down_in smoothing {x} then rotated", smoothed_rotated(m, calib, float(x), plan.rotate_seed))
              for x in a.alpha.split(",")]
    for name, model in cases:
        t = time.perf_counter()
        fp = np.abs(model.forward(ref.windows[:1]) - m.forward(ref.windows[:1])).max()
        q = sasq.quantize(model, plan)
        st = choose_start(q, calib, heldout)
        k0 = kl(q)
        line = f"{name}: FP32 max |logit diff| {fp:.1e}; start {st['chosen']} KL {k0:.5f}"
        if a.steps:
            r = train_scales(q, tr, steps=a.steps, lr=0.03, seqlen=a.seqlen, batch=4,
                             objective="kl", val_ids=ho, val_windows=24, progress=False, seed=0)
            line += f" -> {a.steps} steps {kl(q):.5f} (held-out best at step {r.best_step})"
        print(line + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
