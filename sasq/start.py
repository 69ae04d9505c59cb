"""Where SASQ starts: the best PTQ of the same deployable form, chosen by held-out KL.

Every static PTQ baseline is a point of the folded per-channel form: per-tensor static with scale
s is the fold s_j = s (rounding each weight row is invariant to a uniform factor), and SmoothQuant
with factors f and scale s is the fold s_j = s * f_j (same function up to float rounding). So a
folded per-channel plan can start from any of them, and from the per-channel calibrations
(absmax-mean, absmax, percentile, MSE). `choose_start` calibrates every candidate, measures the
mean per-token KL(FP32 || candidate) on held-out windows (never the reported split), and leaves
the best one in the QuantModel. Training then evaluates this start at step 0 and keeps it unless
a later step beats it on the same held-out KL: SASQ is never worse than its start there.

With truncation, the knee starts either at t = 0.9 c (DESIGN: identity on the bulk) or at the
largest t the parameterisation allows (~ the hard clamp of the PTQ rows); both are candidates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from sasq.calibration import calibrate
from sasq.eval import Reference, perplexity
from sasq.quant import QuantModel, quantize
from sasq.sites import RHO_INIT, RHO_MAX

CHANNEL_METHODS = ("absmax_mean", "absmax", "percentile", "mse")
SMOOTHQUANT_ALPHA = 0.5


def heldout_kl(qmodel, reference: Reference, batch_size: int = 4) -> float:
    """Mean per-token KL(reference || qmodel) on the reference's windows."""
    r = perplexity(qmodel, reference.windows, reference.windows.shape[1], batch_size=batch_size,
                   progress=False, reference=reference)
    return float(r.kl)


def _equivalent(qmodel: QuantModel, twin: QuantModel) -> dict:
    """A state dict of `qmodel` that computes what `twin` computes. twin is a per-tensor (or
    SmoothQuant) plan, or a plan of qmodel's own granularity; either may lack sink rows.
    Folded qmodel: body scale s_j = s (* f_j); per-tensor qmodel: the same s. Sink rows: the
    twin's sink scale is in its arriving domain (x / f), ours in x / (s * f) when folded; a twin
    without sink rows treats them like the body (sink scale 1 on the folded grid, s otherwise)."""
    state = qmodel.state_dict()
    for s in qmodel.site_list():
        t = twin.sites[(s.layer, s.name)]
        if s.scale_key is None or t.scale_key is None:
            continue
        tv = t.value(t.scale_key).astype(np.float64)
        f = twin.smooth.get(t.key)  # fold shape (KV-tied for o_in), like s's parameter
        shape = s.params[s.scale_key].shape
        body = np.broadcast_to(tv, shape) if f is None else float(tv) * f.astype(np.float64)
        state[s.scale_key] = _param(s, body)
        if s.sink_key:
            ref = float(tv) if tv.ndim == 0 else None  # the twin's per-tensor body scale
            if t.sink_key:
                sink = t.value(t.sink_key).astype(np.float64) / (ref if s.folded else 1.0)
            else:
                sink = np.full(s.sink, 1.0 if s.folded else ref)
            state[s.sink_key] = _param(s, sink)
        if s.rho_key:
            state[s.rho_key] = np.full_like(state[s.rho_key], RHO_INIT)
    return state


def _param(site, value):
    v = np.asarray(value, dtype=site.dtype)
    return np.log(v) if site.log else v


def candidate_starts(qmodel: QuantModel, calib, progress: bool = False):
    """Yield (name, state dict) for every PTQ start of qmodel's form (see module doc)."""
    plan = qmodel.plan
    sinks = (plan.sink_tokens, 0) if plan.sink_tokens else (0,)
    # A static KV cache's sink scales are per-tensor in the domain the cache arrives in (v under
    # the o_in fold): a twin's cannot be carried over exactly, so no twin candidates then.
    twins = not (plan.sink_tokens and plan.kv_bits and plan.kv_mode == "static")
    for method in CHANNEL_METHODS:
        calibrate(qmodel, calib, method=method, progress=progress)
        yield f"{plan.granularity}/{method}", qmodel.state_dict()
        if twins and plan.sink_tokens and (plan.folded or plan.granularity == "tensor"):
            # a twin only lends its scales (calibrated on FP activations): RTN weights suffice
            twin = quantize(qmodel.model, dataclasses.replace(plan, sink_tokens=0, weights="rtn",
                                                              w_clip=False, act_order=False))
            yield (f"{plan.granularity}/{method} (sink rows as body)",
                   _equivalent(qmodel, calibrate(twin, calib, method=method, progress=progress)))
    if twins and plan.folded and plan.smoothquant_alpha is None:
        base = dataclasses.replace(plan, granularity="tensor", truncation=False)
        for k in sinks:
            note = "" if k == plan.sink_tokens else " (sink rows as body)"
            for method in ("absmax_mean", "absmax"):
                twin = quantize(qmodel.model, dataclasses.replace(base, sink_tokens=k))
                yield (f"tensor/{method}{note}",
                       _equivalent(qmodel, calibrate(twin, calib, method=method, progress=progress)))
            twin = quantize(qmodel.model, dataclasses.replace(
                base, sink_tokens=k, smoothquant_alpha=SMOOTHQUANT_ALPHA))
            yield (f"smoothquant {SMOOTHQUANT_ALPHA}{note}",
                   _equivalent(qmodel, calibrate(twin, calib, progress=progress)))


def choose_start(qmodel: QuantModel, calib, reference: Reference, progress: bool = False,
                 log=None) -> dict:
    """Calibrate qmodel to the candidate start with the lowest held-out KL (see module doc).
    Returns {"chosen": name, "kl": {name: held-out KL}}."""
    scores, best = {}, None
    for name, state in candidate_starts(qmodel, calib, progress):
        for rho_name, rho in (("", None),) if not qmodel.plan.truncation else \
                (("", RHO_INIT), (" +clamp-like knee", RHO_MAX)):
            st = dict(state)
            if rho is not None:
                st.update({k: np.full_like(v, rho) for k, v in st.items() if k.endswith(".rho")})
            qmodel.load_state_dict(st)
            kl = heldout_kl(qmodel, reference)
            scores[name + rho_name] = kl
            if log is not None:
                log(f"  start {name + rho_name}: held-out KL {kl:.5f}")
            if best is None or kl < best[1]:
                best = (name + rho_name, kl, st)
    qmodel.load_state_dict(best[2])
    return {"chosen": best[0], "kl": scores}
