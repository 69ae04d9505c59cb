"""The catalogue of methods: every row of a results table is one method, i.e. one QuantPlan plus
what the runner does with it (calibrate, train).

  fp32            the frozen model, no quantization
  adapted_fp32    control (a): the same sites/data/steps/optimizer training per-channel gains and
                  clip thresholds with no rounding (how much is domain fit, not quantization)
  static_tensor   static per-tensor absmax (the paper's PTQ init, mean of per-window absmax)
  static_channel  static per-channel absmax PTQ, folded into the weights (deployable)
  dynamic_token   dynamic per-token absmax computed at run time
  smoothquant     SmoothQuant (alpha 0.5) with static per-tensor scales
  sasq            SASQ: per-channel folded scales from the PTQ init, trained (hard clamp)
  sasq_trunc      SASQ with the adaptive truncation before the quantizer
"""
from __future__ import annotations

import re

from sasq.plan import QuantPlan

METHODS = ("fp32", "adapted_fp32", "static_tensor", "static_channel", "dynamic_token",
           "smoothquant", "sasq", "sasq_trunc")
METHOD_LABELS = {
    "fp32": "FP32",
    "adapted_fp32": "adapted FP32 (control a)",
    "static_tensor": "static per-tensor absmax",
    "static_channel": "static per-channel PTQ",
    "dynamic_token": "dynamic per-token",
    "smoothquant": "SmoothQuant static (a=0.5)",
    "sasq": "SASQ hard clamp",
    "sasq_trunc": "SASQ + truncation",
}
TRAINED = ("adapted_fp32", "sasq", "sasq_trunc")  # methods whose parameters are trained
BITLESS = ("fp32", "adapted_fp32")  # one cell per objective, not per bit config
DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4")
SMOOTHQUANT_ALPHA = 0.5


def parse_bits(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", spec.strip())
    if not m:
        raise ValueError(f"bit config {spec!r} is not of the form W<bits>A<bits> (e.g. W8A8)")
    w, a = int(m.group(1)), int(m.group(2))
    if not (2 <= w <= 8 and 2 <= a <= 8):
        raise ValueError(f"bit config {spec!r}: bits must be between 2 and 8")
    return w, a


def make_plan(method: str, w_bits: int | None, a_bits: int | None):
    if method == "adapted_fp32":
        return QuantPlan(w_bits=None, a_bits=None, granularity="channel", fold=False, mode="static",
                         adapt_control=True)
    if method == "static_tensor":
        return QuantPlan(w_bits=w_bits, a_bits=a_bits, granularity="tensor", mode="static")
    if method == "static_channel" or method == "sasq":
        return QuantPlan(w_bits=w_bits, a_bits=a_bits, granularity="channel", fold=True, mode="static")
    if method == "sasq_trunc":
        return QuantPlan(w_bits=w_bits, a_bits=a_bits, granularity="channel", fold=True, mode="static",
                         truncation=True)
    if method == "dynamic_token":
        return QuantPlan(w_bits=w_bits, a_bits=a_bits, granularity="tensor", mode="dynamic")
    if method == "smoothquant":
        return QuantPlan(w_bits=w_bits, a_bits=a_bits, granularity="tensor", mode="static",
                         smoothquant_alpha=SMOOTHQUANT_ALPHA)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def describe(method: str, plan) -> dict:
    """Table columns of a cell: granularity, form, static/dynamic."""
    if plan is None:
        return {"granularity": "-", "form": "-", "mode": "-"}
    if method == "adapted_fp32":
        return {"granularity": "channel", "form": "gains+clips, no rounding", "mode": "static"}
    if plan.mode == "dynamic":
        return {"granularity": "token", "form": "run time", "mode": "dynamic"}
    gran = plan.granularity
    form = "folded" if (gran == "channel" and plan.fold) else ("fake per-channel" if gran == "channel"
                                                                else "per-tensor")
    if getattr(plan, "truncation", False):
        form += " + trunc"
    return {"granularity": gran, "form": form, "mode": plan.mode}
