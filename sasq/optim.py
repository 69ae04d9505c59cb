"""The optimizer state of scale-only training: the variables Adam moves, Adam itself, and the
checkpoint that holds both (with the loop's counters), validated before anything is loaded.

Variable space (`space=`): "native" optimises qmodel.params as stored (log-scales by default, see
sasq.sites); "linear" re-parameterises the log-stored entries to s = exp(p) and runs Adam on s
(dL/ds = dL/dp / s). Linear-space positive parameters (ours, and a QuantPlan(param_space=
"linear")'s own scale/clip/gain) are projected back above _POSITIVE_FLOOR x their starting value
after each step: an Adam step of size lr can cross zero. The floors are saved in the checkpoint,
so a resume does not depend on the parameters it starts from.

Checkpoint: one .npz written atomically (temp file, fsync, rename). Arrays are stored under their
parameter name ("var:<key>", "m:<key>", "v:<key>", "best:<key>", "floor:<key>") plus a JSON
"__state__" (version, settings, step, counters, histories, the Generator state). load_checkpoint
checks every array's name, shape, dtype and range against what the run expects before returning,
and turns any unreadable or tampered file into one ValueError naming the file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sasq.atomic import atomic_write

SPACES = ("native", "linear")
CHECKPOINT_VERSION = 2
_MIN_LINEAR = 1e-30  # smallest linear-space value mapped back to log space (exp(-80) ~ 1.8e-35)
_POSITIVE_FLOOR = 1e-3
_POSITIVE = ("scale", "clip", "gain")
_KINDS = ("var", "m", "v", "best", "floor")


def _log_keys(qmodel) -> set[str]:
    """Which params are stored as logarithms (QuantModel says so; else guess from the name)."""
    fn = getattr(qmodel, "log_param_keys", None)
    if callable(fn):
        return set(fn())
    return {k for k in qmodel.params if "log" in k.lower()}


class ParamSpace:
    """Optimisation variables: the params themselves, or exp() of their log-scale entries."""

    def __init__(self, qmodel, space: str):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.q = qmodel
        logs = _log_keys(qmodel)
        self.linear = set(logs) if space == "linear" else set()
        if space == "linear" and not self.linear:
            raise ValueError("space='linear' needs log-parameterised scales; this QuantModel has none")
        pos = self.linear | {k for k in qmodel.params
                             if k not in logs and k.rsplit(".", 1)[-1] in _POSITIVE}
        self.floors = {}
        for k in pos:
            p = qmodel.params[k].astype(np.float64)
            v0 = np.exp(p) if k in self.linear else p
            self.floors[k] = (v0 * _POSITIVE_FLOOR).astype(qmodel.params[k].dtype)

    def get(self) -> dict[str, np.ndarray]:
        out = {}
        for k, p in self.q.params.items():
            out[k] = np.exp(p.astype(np.float64)).astype(p.dtype) if k in self.linear else p.copy()
        return out

    def grads(self, var: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (gk / var[k] if k in self.linear else gk) for k, gk in self.q.grads.items()}

    def project(self, var: dict[str, np.ndarray]) -> None:
        for k, floor in self.floors.items():
            np.maximum(var[k], floor, out=var[k])

    def put(self, var: dict[str, np.ndarray]) -> None:
        for k, v in var.items():
            p = self.q.params[k]
            if k in self.linear:
                p[...] = np.log(np.maximum(v.astype(np.float64), _MIN_LINEAR))
            else:
                p[...] = v
        self.q.sync()


class Adam:
    """Adam (Kingma & Ba) on a dict of arrays, bias-corrected; moments in the variables' dtype."""

    def __init__(self, var: dict[str, np.ndarray], betas=(0.9, 0.999), eps=1e-8):
        self.var = var
        self.keys = sorted(var)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.m = {k: np.zeros_like(var[k]) for k in self.keys}
        self.v = {k: np.zeros_like(var[k]) for k in self.keys}

    def step(self, grads: dict[str, np.ndarray], lr: float, t: int) -> None:
        """Update number t (1-based) with learning rate lr."""
        b1, b2 = self.beta1, self.beta2
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        for k in self.keys:
            g = grads[k]
            if not np.all(np.isfinite(g)):
                raise FloatingPointError(f"non-finite gradient for {k!r} at step {t - 1} "
                                         f"(lr {lr:g} too high?)")
            m, v = self.m[k], self.v[k]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * g * g
            self.var[k] -= (lr * (m / bc1) / (np.sqrt(v / bc2) + self.eps)).astype(self.var[k].dtype)


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state: dict, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """state: JSON-able dict; arrays: kind ("var", "m", "v", "best", "floor") -> {key: array}."""
    out = {"__state__": np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)}
    for kind, d in arrays.items():
        if d:
            for k, a in d.items():
                out[f"{kind}:{k}"] = a
    with atomic_write(Path(path), "wb") as f:
        np.savez(f, **out)


def load_checkpoint(path, expect: dict | None = None):
    """-> (state, arrays) as save_checkpoint wrote them. With `expect` (key -> (shape, dtype) of
    every trained parameter) the file must hold exactly those keys for var/m/v (best and floor
    optional, subsets for floor), each with that shape and dtype, finite, with v >= 0; the state
    must be well-formed. Any problem: ValueError naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            if "__state__" not in files:
                raise ValueError("no __state__ record")
            state = json.loads(bytes(z["__state__"]).decode())
            arrays = {kind: {} for kind in _KINDS}
            for name in files:
                if name == "__state__":
                    continue
                kind, sep, key = name.partition(":")
                if not sep or kind not in arrays:
                    raise ValueError(f"unexpected array {name!r}")
                arrays[kind][key] = z[name]
    except FileNotFoundError:
        raise
    except Exception as e:  # a damaged zip raises many kinds (BadZipFile, zlib, NotImplemented)
        raise ValueError(f"{path}: not a readable sasq training checkpoint "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        v = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"{path}: checkpoint version {v!r} != {CHECKPOINT_VERSION}")
    if expect is not None:
        _validate(path, state, arrays, expect)
    return state, arrays


def _validate(path, state, arrays, expect) -> None:
    def bad(msg):
        raise ValueError(f"{path}: {msg}")

    want = set(expect)
    for kind in ("var", "m", "v"):
        got = set(arrays[kind])
        if got != want:
            bad(f"{kind} arrays do not match the trained parameters (missing "
                f"{sorted(want - got)[:3]}, unexpected {sorted(got - want)[:3]})")
    if arrays["best"] and set(arrays["best"]) != want:
        bad("best-parameter arrays do not match the trained parameters")
    if not set(arrays["floor"]) <= want:
        bad(f"floor arrays for unknown parameters {sorted(set(arrays['floor']) - want)[:3]}")
    for kind, d in arrays.items():
        for k, a in d.items():
            shape, dtype = expect[k]
            if a.shape != tuple(shape):
                bad(f"{kind}:{k} has shape {a.shape}, the parameter has {tuple(shape)}")
            if a.dtype != np.dtype(dtype):
                bad(f"{kind}:{k} has dtype {a.dtype}, the parameter has {np.dtype(dtype)}")
            if not np.all(np.isfinite(a)):
                bad(f"{kind}:{k} has non-finite values")
            if kind in ("v", "floor") and np.any(a < 0):
                bad(f"{kind}:{k} has negative values (it must be >= 0)")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        bad(f"step {step!r} is not an integer >= 0")
    for name in ("history", "val_history"):
        if not isinstance(state.get(name), list):
            bad(f"state field {name!r} is missing or not a list")
    for name in ("loss_ema", "best_val", "initial_val"):
        x = state.get(name)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))
                              or not math.isfinite(x)):
            bad(f"state field {name!r} = {x!r} is not a finite number or null")
    if not isinstance(state.get("bad_evals"), int) or state["bad_evals"] < 0:
        bad("state field 'bad_evals' is not an integer >= 0")
    if not isinstance(state.get("stopped_early"), bool):
        bad("state field 'stopped_early' is not a boolean")
    rng = state.get("rng")
    try:
        g = np.random.default_rng()
        g.bit_generator.state = rng
    except (TypeError, ValueError, KeyError) as e:
        bad(f"the random generator state is not valid ({e})")
