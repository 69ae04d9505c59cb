"""Scale-only quantization-aware training (SASQ): Adam on a QuantModel's trainable parameters.

The weights stay frozen. Only `qmodel.params` (activation scales, stored by sasq.quant as
log-scales, plus truncation thresholds or the adapted-FP32 gains) receive updates; their
gradients come from `qmodel.backward` (STE/LSQ gradients from the C kernels).

One step:
    ids (B, T+1) sampled from train_ids with a seeded np.random.Generator
    tape = qmodel.forward_tape(ids[:, :-1])            # logits (B, T, V)
    loss, dlogits = CE(next token) or KL(p_fp32 || p_q)  # row chunks, sasq.losses
    qmodel.backward(tape, dlogits)                      # fills qmodel.grads
    Adam update of qmodel.params; qmodel.sync()

Reproducibility: the same seed gives the same batches and the same final parameters. An
interrupted run resumed from its checkpoint reaches bit-identical final parameters, because the
checkpoint holds everything the loop depends on: params, Adam moments, the Generator state, the
step, the best-so-far parameters and early-stopping counters. Checkpoints are one .npz file
written atomically (temp file in the same directory, fsync, os.replace).

Parameter space (`space=`): "native" optimises qmodel.params as stored (log-scales by default
in sasq.quant); "linear" re-parameterises the log-scale entries to s = exp(p) and runs Adam on s
(chain rule dL/ds = dL/dp / s); QuantPlan(param_space="linear") stores linear scales directly.
Linear-space positive parameters are projected back above 1e-3 of their starting value after
each step (an Adam step of size lr can cross zero).

Measured (stories260K, W4A4 static per-channel folded, KL objective, 25 steps of 1x256 tokens
of WikiText-2 valid, held-out KL on 4 windows, start 1.331): log space lr 1e-3 / 1e-2 / 3e-2 /
1e-1 -> best 1.271 / 1.219 / 1.022 / 1.253; linear space lr 1e-4 / 1e-3 / 3e-3 / 1e-2 -> 1.321 /
1.207 / 1.208 / 1.115 (1e-2 crashes without the projection). Log space trains better, with
lr ~3e-2 (the default): Adam on log-scales takes relative steps, so one lr serves sites whose
ranges differ by orders of magnitude. LSQ's gradient scale (QuantPlan(lsq_grad_scale=True)) gave
no gain under Adam (1.044 at 3e-2, 1.195 at 1e-1): Adam normalises constant factors away.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sasq import losses
from sasq.atomic import atomic_write

OBJECTIVES = ("ce", "kl")
SCHEDULES = ("cosine", "constant")
SPACES = ("native", "linear")
CHECKPOINT_VERSION = 1
# Smallest linear-space scale kept when mapping back to log space (exp(-80) ~ 1.8e-35).
_MIN_LINEAR = 1e-30
# Linear-space positive parameters never go below this fraction of their starting value.
_POSITIVE_FLOOR = 1e-3
_POSITIVE = ("scale", "clip", "gain")


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including before a resume)
    final_loss: float  # running (EMA) training loss at the end
    best_val: float | None  # best held-out loss (None without a val split)
    best_step: int | None  # step at which best_val was measured (0 = before training)
    initial_val: float | None
    stopped_early: bool
    resumed_from: int | None  # step loaded from the checkpoint, None for a fresh run
    seconds: float  # wall time of this call's training steps
    seconds_per_step: float | None
    history: list = field(default_factory=list)  # [{"step", "loss", "lr"}]
    val_history: list = field(default_factory=list)  # [{"step", "val"}]

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- data

def _as_ids(ids, name):
    a = np.asarray(ids)
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be a 1-D token stream or 2-D (n, L) windows, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def sample_batch(rng: np.random.Generator, ids: np.ndarray, batch: int, length: int) -> np.ndarray:
    """(batch, length) random windows: from a 1-D stream (any offset) or from rows of (n, L)."""
    if ids.ndim == 1:
        hi = ids.shape[0] - length
        if hi < 0:
            raise ValueError(f"train_ids has {ids.shape[0]} tokens, fewer than seqlen+1 = {length}")
        start = rng.integers(0, hi + 1, size=batch)
        return ids[start[:, None] + np.arange(length)]
    n, width = ids.shape
    if width < length:
        raise ValueError(f"train_ids windows have {width} tokens, fewer than seqlen+1 = {length}")
    row = rng.integers(0, n, size=batch)
    off = rng.integers(0, width - length + 1, size=batch)
    return ids[row[:, None], off[:, None] + np.arange(length)]


def fixed_windows(ids: np.ndarray, length: int, n_max: int | None) -> np.ndarray:
    """Deterministic non-overlapping (n, length) windows for validation."""
    if ids.ndim == 1:
        n = ids.shape[0] // length
        w = ids[: n * length].reshape(n, length)
    else:
        if ids.shape[1] < length:
            raise ValueError(f"val_ids windows have {ids.shape[1]} tokens, need {length}")
        w = ids[:, :length]
    if w.shape[0] == 0:
        raise ValueError(f"val_ids too short for one window of {length} tokens")
    return w if n_max is None else w[:n_max]


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup: int, min_lr_ratio: float) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- parameter space

def _log_keys(qmodel) -> set[str]:
    """Which params are stored as logarithms (sasq.quant says so; else guess from the name)."""
    fn = getattr(qmodel, "log_param_keys", None)
    if callable(fn):
        return set(fn())
    if isinstance(fn, (set, list, tuple, frozenset)):
        return set(fn)
    return {k for k in qmodel.params if "log" in k.lower()}


class _Space:
    """Optimisation variables: the params themselves, or exp() of their log-scale entries."""

    def __init__(self, qmodel, space: str):
        self.q = qmodel
        logs = _log_keys(qmodel)
        self.linear = set(logs) if space == "linear" else set()
        if space == "linear" and not self.linear:
            raise ValueError("space='linear' needs log-parameterised scales; this QuantModel has none")
        # Positive parameters optimised in linear space: ours (exp of log-scales) and the
        # QuantModel's own linear ones (QuantPlan(param_space="linear"): "*.scale/clip/gain").
        pos = self.linear | {k for k in qmodel.params if k not in logs and k.rsplit(".", 1)[-1] in _POSITIVE}
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
        g = {}
        for k, gk in self.q.grads.items():
            g[k] = gk / var[k] if k in self.linear else gk  # dL/ds = dL/dlog s / s
        return g

    def project(self, var: dict[str, np.ndarray]) -> None:
        """Keep linear-space scales/clips/gains positive: an Adam step of size lr can cross zero.
        Floor: _POSITIVE_FLOOR x the value at the start of training (projected gradient)."""
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


# --------------------------------------------------------------------------- checkpoints

def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that `path` is either the old file or the complete new one."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def save_checkpoint(path, keys, var, m, v, best, state: dict, floors=None) -> None:
    arrays = {"__state__": np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)}
    for i, k in enumerate(keys):
        arrays[f"var{i}"] = var[k]
        arrays[f"m{i}"] = m[k]
        arrays[f"v{i}"] = v[k]
        if best is not None:
            arrays[f"best{i}"] = best[k]
        if floors and k in floors:
            arrays[f"floor{i}"] = floors[k]
    _atomic_savez(Path(path), arrays)


def load_checkpoint(path):
    """-> (state dict, var, m, v, best or None), each a dict keyed by parameter name.
    state["floors"] holds the positivity floors of linear-space parameters (see _Space)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            state = json.loads(bytes(z["__state__"]).decode())
            keys = state["keys"]
            var = {k: z[f"var{i}"] for i, k in enumerate(keys)}
            m = {k: z[f"m{i}"] for i, k in enumerate(keys)}
            v = {k: z[f"v{i}"] for i, k in enumerate(keys)}
            best = {k: z[f"best{i}"] for i, k in enumerate(keys)} if "best0" in z.files else None
            floors = {k: z[f"floor{i}"] for i, k in enumerate(keys) if f"floor{i}" in z.files}
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable sasq training checkpoint ({e})") from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} != {CHECKPOINT_VERSION}")
    state["floors"] = floors
    return state, var, m, v, best


# --------------------------------------------------------------------------- loss helpers

def _teacher_hidden(teacher, x):
    return teacher.forward(x, return_hidden=True)  # (B, T, C)


def _val_loss(qmodel, windows, objective, teacher, teacher_cache, batch, chunk_rows) -> float:
    """Mean held-out loss (same objective as training) over fixed windows (n, T+1)."""
    total, rows = 0.0, 0
    for b0 in range(0, windows.shape[0], batch):
        w = windows[b0:b0 + batch]
        x, y = w[:, :-1], w[:, 1:]
        h = qmodel.forward(x, return_hidden=True)  # (b, T, C)
        if objective == "ce":
            loss = losses.ce_forward((h, qmodel.lm_head), y, chunk_rows)
        else:
            if b0 not in teacher_cache:
                teacher_cache[b0] = _teacher_hidden(teacher, x)
            loss = losses.kl_forward((h, qmodel.lm_head), (teacher_cache[b0], teacher.lm_head), chunk_rows)
        total += loss * x.size
        rows += x.size
    return total / rows


# --------------------------------------------------------------------------- training

def train_scales(
    qmodel,
    train_ids,
    steps: int,
    lr: float = 3e-2,
    seqlen: int = 512,
    batch: int = 4,
    objective: str = "ce",
    teacher=None,
    schedule: str = "cosine",
    warmup: int | None = None,
    min_lr_ratio: float = 0.0,
    val_ids=None,
    val_windows: int | None = 8,
    eval_every: int | None = None,
    patience: int | None = None,
    checkpoint=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    space: str = "native",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    recompute: bool = False,
    chunk_rows: int = losses.DEFAULT_CHUNK_ROWS,
    stop_at: int | None = None,
    callback=None,
) -> TrainResult:
    """Train qmodel.params in place with Adam; returns a TrainResult.

    train_ids: 1-D token stream or (n, L) windows (L >= seqlen + 1); each step samples `batch`
    windows of seqlen + 1 tokens. objective "ce" (next-token cross-entropy) or "kl" (KL from the
    FP32 teacher's distribution, default teacher = qmodel.model; its logits are computed on the
    fly in row chunks). schedule "cosine" (to min_lr_ratio*lr) or "constant", after `warmup`
    linear steps (default 5 % of steps). With val_ids, the held-out loss (same objective, first
    `val_windows` windows) is measured before training, every `eval_every` steps and at the end;
    the best parameters are kept and loaded back at the end; `patience` evaluations without
    improvement stop early. `checkpoint` (a file path, .npz) is written atomically every
    `checkpoint_every` steps and at the end; resume=True continues from it if it exists (a
    finished checkpoint returns at once). `stop_at` ends the call after that global step (the
    checkpoint is written first), and `callback(step, info) -> bool` runs after every step; True
    stops. Both simulate interruptions in tests.
    """
    # ---- validate arguments (clear errors before any work)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    for name, val in (("steps", steps), ("seqlen", seqlen), ("batch", batch)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not getattr(qmodel, "params", None):
        raise ValueError("qmodel has no trainable params (is the plan FP32 or dynamic?)")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    max_pos = getattr(getattr(qmodel, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    train_ids = _as_ids(train_ids, "train_ids")
    val = fixed_windows(_as_ids(val_ids, "val_ids"), seqlen + 1, val_windows) if val_ids is not None else None
    if objective == "kl" and teacher is None:
        teacher = getattr(qmodel, "model", None)
        if teacher is None:
            raise ValueError("objective='kl' needs a teacher (qmodel.model is missing)")
    warmup = max(0, steps // 20) if warmup is None else int(warmup)
    if eval_every is None:
        eval_every = max(1, steps // 10)
    if checkpoint_every is None:
        checkpoint_every = max(1, steps // 10)
    beta1, beta2 = betas

    space_ = _Space(qmodel, space)
    keys = sorted(qmodel.params)
    config = dict(steps=int(steps), lr=float(lr), seqlen=int(seqlen), batch=int(batch),
                  objective=objective, schedule=schedule, warmup=warmup, min_lr_ratio=float(min_lr_ratio),
                  seed=int(seed), space=space, betas=[float(beta1), float(beta2)], eps=float(eps),
                  eval_every=int(eval_every), patience=patience,
                  val_windows=None if val is None else int(val.shape[0]),
                  shapes={k: list(qmodel.params[k].shape) for k in keys})

    # ---- state: fresh or from the checkpoint
    rng = np.random.default_rng(seed)
    var = space_.get()
    m = {k: np.zeros_like(var[k]) for k in keys}
    v = {k: np.zeros_like(var[k]) for k in keys}
    best = None
    st = dict(version=CHECKPOINT_VERSION, keys=keys, config=config, step=0, loss_ema=None,
              best_val=None, best_step=None, initial_val=None, bad_evals=0, stopped_early=False,
              history=[], val_history=[])
    resumed_from = None
    if resume and Path(checkpoint).exists():
        st_l, var_l, m_l, v_l, best_l = load_checkpoint(checkpoint)
        if st_l["config"] != config:
            diff = sorted(k for k in config if st_l["config"].get(k) != config[k])
            raise ValueError(f"{checkpoint}: checkpoint was written with different settings ({', '.join(diff)})")
        st, var, m, v, best = st_l, var_l, m_l, v_l, best_l
        rng.bit_generator.state = st.pop("rng")
        space_.floors.update(st.pop("floors"))
        space_.put(var)
        resumed_from = st["step"]

    teacher_cache: dict = {}
    done = st["step"] >= steps or st["stopped_early"]

    def snapshot():
        return {k: a.copy() for k, a in var.items()}

    def evaluate(step):
        vl = _val_loss(qmodel, val, objective, teacher, teacher_cache, batch, chunk_rows)
        st["val_history"].append({"step": step, "val": vl})
        if step == 0:
            st["initial_val"] = vl
        nonlocal best
        if st["best_val"] is None or vl < st["best_val"]:
            st["best_val"], st["best_step"], st["bad_evals"] = vl, step, 0
            best = snapshot()
        else:
            st["bad_evals"] += 1
        return vl

    def save():
        if checkpoint is None:
            return
        state = dict(st)
        state["rng"] = rng.bit_generator.state
        save_checkpoint(checkpoint, keys, var, m, v, best, state, space_.floors)

    if val is not None and st["step"] == 0 and not st["val_history"]:
        evaluate(0)

    t0 = time.perf_counter()
    n_run = 0
    bar = None
    if not done:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=st["step"], desc=f"train scales ({objective})",
                       disable=not progress, leave=False, dynamic_ncols=True)
        except ImportError:  # tqdm is a dependency, but training must not need a terminal
            bar = None
    try:
        while not done:
            step = st["step"]
            cur_lr = lr_at(step, steps, lr, schedule, warmup, min_lr_ratio)
            w = sample_batch(rng, train_ids, batch, seqlen + 1)  # (B, T+1)
            x, y = w[:, :-1], w[:, 1:]
            qmodel.zero_grad()
            tape = qmodel.forward_tape(x, recompute=recompute)
            if objective == "ce":
                loss, dlogits = losses.ce_loss_and_grad(tape.logits, y, chunk_rows)
            else:
                th = _teacher_hidden(teacher, x)
                loss, dlogits = losses.kl_loss_and_grad(tape.logits, (th, teacher.lm_head), chunk_rows)
                del th
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step} (lr {cur_lr:g} too high?)")
            qmodel.backward(tape, dlogits)
            del tape, dlogits
            g = space_.grads(var)
            t = step + 1
            bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            for k in keys:
                gk = g[k]
                if not np.all(np.isfinite(gk)):
                    raise FloatingPointError(f"non-finite gradient for {k!r} at step {step} (lr {cur_lr:g} too high?)")
                m[k] *= beta1
                m[k] += (1.0 - beta1) * gk
                v[k] *= beta2
                v[k] += (1.0 - beta2) * gk * gk
                var[k] -= (cur_lr * (m[k] / bc1) / (np.sqrt(v[k] / bc2) + eps)).astype(var[k].dtype)
            space_.project(var)
            space_.put(var)
            st["step"] = t
            st["loss_ema"] = loss if st["loss_ema"] is None else 0.9 * st["loss_ema"] + 0.1 * loss
            st["history"].append({"step": t, "loss": loss, "lr": cur_lr})
            n_run += 1
            if val is not None and (t % eval_every == 0 or t == steps):
                evaluate(t)
                if patience is not None and st["bad_evals"] >= patience:
                    st["stopped_early"] = True
            done = t >= steps or st["stopped_early"]
            if checkpoint is not None and (t % checkpoint_every == 0 or done):
                save()
            if bar is not None:
                post = {"loss": f"{st['loss_ema']:.4f}"}
                if st["best_val"] is not None:
                    post["val"] = f"{st['best_val']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            info = {"loss": loss, "lr": cur_lr, "loss_ema": st["loss_ema"]}
            if callback is not None and callback(t, info):
                if checkpoint is not None:
                    save()
                break
            if stop_at is not None and t >= stop_at and not done:
                if checkpoint is not None:
                    save()
                break
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    finished = st["step"] >= steps or st["stopped_early"]
    if finished and best is not None:
        # Keep the best held-out parameters (the final ones when they are the best).
        for k in keys:
            var[k][...] = best[k]
        space_.put(var)
    return TrainResult(
        steps=st["step"], final_loss=st["loss_ema"], best_val=st["best_val"], best_step=st["best_step"],
        initial_val=st["initial_val"], stopped_early=st["stopped_early"], resumed_from=resumed_from,
        seconds=seconds, seconds_per_step=seconds / n_run if n_run else None,
        history=st["history"], val_history=st["val_history"])
