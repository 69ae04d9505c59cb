"""The catalogue of methods: every row of a results table is one Method, i.e. one QuantPlan plus
what the runner does with it (calibrate how, train or not).

  fp32                 the frozen model, no quantization
  adapted_fp32         control (a): SASQ's sites/data/steps/optimizer training per-channel gains
                       and clip thresholds with no rounding (how much is domain fit)
  static_tensor        static per-tensor, mean of per-window absmax (the paper's PTQ init)
  static_tensor_sink   the same with the first `sink` positions on their own static scales
  static_channel       static per-channel absmax-mean, folded into the weights (deployable)
  static_channel_sink  the same, sink-aware
  smoothquant          SmoothQuant (alpha 0.5) with static per-tensor scales
  smoothquant_sink     the same, sink-aware
  dynamic_token        dynamic per-token absmax computed at run time
  sasq                 SASQ: folded per-channel, sink-aware, trained from the best PTQ start
                       (sasq.start: chosen by held-out KL), hard clamp
  sasq_trunc           the same with the adaptive truncation before the quantizer
  gptq                 GPTQ weights (calibration Hessians), dynamic per-token activations
  quarot_rtn           QuaRot-style: rotation, RTN weights, dynamic per-token activations (clip
                       0.9 at 4-bit activations, as QuaRot)
  quarot_gptq          the same with GPTQ weights
  sasq_rot             SASQ on the rotated model: static per-tensor, sink-aware, best start, trained
  sasq_rot_gptq        the same with GPTQ weights
Rotated rows use searched weight scales (QuaRot's w_clip, sasq.wclip), as QuaRot does. Measured
on SmolLM2-135M W4A16 (6 x 512 held-out WikiText-2 valid windows, FP32 19.71): rotation + RTN
100.92 -> 44.90, rotation + GPTQ 22.97 -> 21.56 (act-order on top: 21.56, not used). Without
rotation GPTQ in index order loses to RTN there (40.69 vs 37.90: the massive activation channels'
columns come late), in act-order it wins (28.28; with searched scales 27.47, the `gptq` row's
setting; searched scales with RTN alone are not used without rotation).
A bit config "WxA16" leaves activations in float: the dynamic rows are then the weight-only
baselines (RTN, GPTQ, with and without rotation) and the static rows are skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from sasq.plan import QuantPlan

DEFAULT_BITS = ("W8A8", "W6A6", "W4A8", "W4A4")
SMOOTHQUANT_ALPHA = 0.5
# Positions with their own static scales in the sink-aware rows. Measured on SmolLM2-135M (8 x 512
# WikiText-2 valid windows, A8 static per-tensor, see the closing note of the fidelity issue):
# the massive activation sits on position 0, and in some windows on position 1; 4 rows hold it
# with room, more rows add nothing.
SINK_TOKENS = 4


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    plan: Callable  # (w_bits, a_bits) -> QuantPlan | None
    calibrate: str | None = None  # a calibration method, "best" (sasq.start), or None
    train: bool = False
    bitless: bool = False  # one cell per objective, not per bit config
    weight_only_label: str | None = None  # its name at A16 (None: skipped at A16)


def _static(granularity, **kw):
    def plan(w, a):
        k = dict(kw, w_clip=kw.get("w_clip", False) and w is not None)  # no weights, no search
        return QuantPlan(w_bits=w, a_bits=a, granularity=granularity, mode="static", **k)
    return plan


def _dynamic(rotate=False, gptq=False):
    """Dynamic per-token activations (or none at A16); when rotated, QuaRot's 0.9 clip at <= 4-bit
    activations and its searched weight scales (w_clip); GPTQ without rotation in act-order with
    searched scales (the massive channels' columns first: see the module docstring)."""
    def plan(w, a):
        clip = 0.9 if rotate and a is not None and a <= 4 else 1.0
        return QuantPlan(w_bits=w, a_bits=a, mode="dynamic" if a is not None else "static",
                         rotate=rotate, weights="gptq" if gptq else "rtn", dynamic_clip=clip,
                         w_clip=(rotate or gptq) and w is not None,
                         act_order=gptq and not rotate)
    return plan


CATALOGUE = {m.key: m for m in [
    Method("fp32", "FP32", lambda w, a: None, bitless=True),
    Method("adapted_fp32", "adapted FP32 (control a)",
           lambda w, a: QuantPlan(w_bits=None, a_bits=None, granularity="channel", fold=False,
                                  adapt_control=True, sink_tokens=SINK_TOKENS),
           calibrate="absmax_mean", train=True, bitless=True),
    Method("static_tensor", "static per-tensor", _static("tensor"), "absmax_mean"),
    Method("static_tensor_sink", "static per-tensor +sink",
           _static("tensor", sink_tokens=SINK_TOKENS), "absmax_mean"),
    Method("static_channel", "static per-channel (folded)", _static("channel"), "absmax_mean"),
    Method("static_channel_sink", "static per-channel (folded) +sink",
           _static("channel", sink_tokens=SINK_TOKENS), "absmax_mean"),
    Method("smoothquant", "SmoothQuant static",
           _static("tensor", smoothquant_alpha=SMOOTHQUANT_ALPHA), "absmax_mean"),
    Method("smoothquant_sink", "SmoothQuant static +sink",
           _static("tensor", smoothquant_alpha=SMOOTHQUANT_ALPHA, sink_tokens=SINK_TOKENS),
           "absmax_mean"),
    Method("dynamic_token", "dynamic per-token",
           lambda w, a: QuantPlan(w_bits=w, a_bits=a, mode="dynamic"),
           weight_only_label="RTN weight-only"),
    Method("sasq", "SASQ hard clamp +sink", _static("channel", sink_tokens=SINK_TOKENS), "best",
           train=True),
    Method("sasq_trunc", "SASQ + truncation +sink",
           _static("channel", sink_tokens=SINK_TOKENS, truncation=True), "best", train=True),
    Method("gptq", "GPTQ, dynamic per-token", _dynamic(gptq=True), "absmax_mean",
           weight_only_label="GPTQ weight-only"),
    Method("quarot_rtn", "QuaRot-RTN (dynamic)", _dynamic(rotate=True), None,
           weight_only_label="rotation + RTN weight-only"),
    Method("quarot_gptq", "QuaRot-GPTQ (dynamic)", _dynamic(rotate=True, gptq=True), "absmax_mean",
           weight_only_label="rotation + GPTQ weight-only"),
    Method("sasq_rot", "SASQ + rotation +sink",
           _static("tensor", sink_tokens=SINK_TOKENS, rotate=True, w_clip=True), "best", train=True),
    Method("sasq_rot_gptq", "SASQ + rotation + GPTQ +sink",
           _static("tensor", sink_tokens=SINK_TOKENS, rotate=True, weights="gptq", w_clip=True),
           "best", train=True),
]}
METHODS = tuple(CATALOGUE)
METHOD_LABELS = {k: m.label for k, m in CATALOGUE.items()}
TRAINED = tuple(k for k, m in CATALOGUE.items() if m.train)
BITLESS = tuple(k for k, m in CATALOGUE.items() if m.bitless)
# What SASQ must not lose to: the untrained rows with static activation scales (GPTQ/QuaRot rows
# calibrate too, but their activations are dynamic).
STATIC_PTQ = tuple(k for k, m in CATALOGUE.items()
                   if not m.train and m.calibrate is not None and m.plan(8, 8).mode == "static")
SASQ_ROWS = tuple(k for k in TRAINED if not CATALOGUE[k].bitless)


def method(key: str) -> Method:
    if key not in CATALOGUE:
        raise ValueError(f"unknown method {key!r}; choose from {', '.join(METHODS)}")
    return CATALOGUE[key]


def parse_bits(spec: str) -> tuple[int | None, int | None]:
    """"W4A8" -> (4, 8); 16 means not quantized: "W4A16" -> (4, None)."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", spec.strip())
    if not m:
        raise ValueError(f"bit config {spec!r} is not of the form W<bits>A<bits> (e.g. W8A8)")
    w, a = int(m.group(1)), int(m.group(2))
    if not all(2 <= b <= 8 or b == 16 for b in (w, a)) or w == a == 16:
        raise ValueError(f"bit config {spec!r}: bits must be between 2 and 8, or 16 (float)")
    return (None if w == 16 else w), (None if a == 16 else a)


def applies(key: str, w_bits, a_bits) -> bool:
    """Whether a method has a cell at this bit config (static rows need quantized activations)."""
    m = method(key)
    return m.bitless or a_bits is not None or m.weight_only_label is not None


def row_label(key: str, a_bits) -> str:
    m = method(key)
    return m.weight_only_label if (a_bits is None and m.weight_only_label) else m.label


def make_plan(key: str, w_bits: int | None, a_bits: int | None):
    return method(key).plan(w_bits, a_bits)


def describe(key: str, plan) -> dict:
    """Table columns of a cell: granularity, form, static/dynamic, weight quantization."""
    if plan is None:
        return {"granularity": "-", "form": "-", "mode": "-", "weights": "-"}
    weights = "-" if plan.w_bits is None else f"{plan.weights.upper()} per-channel W{plan.w_bits}"
    if plan.w_bits is not None and plan.w_clip:
        weights += " (searched clip)"
    if plan.rotate:
        weights += ", rotated"
    if plan.a_bits is None and not plan.adapt_control:
        return {"granularity": "-", "form": "weights only", "mode": "-", "weights": weights}
    if plan.adapt_control:
        return {"granularity": "channel", "form": "gains+clips, no rounding", "mode": "static",
                "weights": weights}
    if plan.mode == "dynamic":
        return {"granularity": "token", "form": "run time", "mode": "dynamic", "weights": weights}
    gran = plan.granularity
    form = "folded" if (gran == "channel" and plan.fold) else ("fake per-channel" if gran == "channel"
                                                                else "per-tensor")
    if plan.truncation:
        form += " + trunc"
    if plan.sink_tokens:
        form += f" + {plan.sink_tokens} sink rows"
    return {"granularity": gran, "form": form, "mode": plan.mode, "weights": weights}
