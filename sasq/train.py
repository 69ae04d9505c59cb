"""Scale-only quantization-aware training (SASQ): the loop.

The weights stay frozen. Only `qmodel.params` (activation scales, truncation thresholds or the
adapted-FP32 gains) move; their gradients come from `qmodel.backward` (STE/LSQ, sasq.sites).

One step:
    ids (B, T+1) = sample_batch(rng, train_ids)         # sasq.data, seeded Generator
    tape = qmodel.forward_tape(ids[:, :-1])              # logits (B, T, V)
    loss, dlogits = CE(next token) or KL(p_fp32 || p_q)  # row chunks, sasq.losses
    qmodel.backward(tape, dlogits)                       # fills qmodel.grads
    Adam step on the variables, projection, qmodel.sync()   # sasq.optim

Settings live in one TrainConfig; the optimizer state and checkpoints in sasq.optim; data in
sasq.data. Reproducibility: the same seed gives the same batches and the same final parameters,
and an interrupted run resumed from its checkpoint reaches bit-identical final parameters (the
checkpoint holds params, Adam moments, the Generator state, the step, the best-so-far parameters
and early-stopping counters).

Measured (stories260K, W4A4 static per-channel folded, KL objective, 25 steps of 1x256 tokens
of WikiText-2 valid, held-out KL on 4 windows, start 1.331): log space lr 1e-3 / 1e-2 / 3e-2 /
1e-1 -> best 1.271 / 1.219 / 1.022 / 1.253; linear space lr 1e-4 / 1e-3 / 3e-3 / 1e-2 -> 1.321 /
1.207 / 1.208 / 1.115 (1e-2 crashes without the projection). Log space trains better, with
lr ~3e-2 (the default): Adam on log-scales takes relative steps, so one lr serves sites whose
ranges differ by orders of magnitude. LSQ's gradient scale (QuantPlan(lsq_grad_scale=True)) gave
no gain under Adam (1.044 at 3e-2, 1.195 at 1e-1): Adam normalises constant factors away.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sasq import losses
from sasq.data import as_token_ids, check_seqlen, cut_windows, sample_batch
from sasq.optim import CHECKPOINT_VERSION, SPACES, Adam, ParamSpace, load_checkpoint, save_checkpoint
from sasq.rotate import ROTATION_VERSION

OBJECTIVES = ("ce", "kl")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting that changes the numbers of a training run (a resumed run must match)."""
    steps: int
    lr: float = 3e-2
    seqlen: int = 512
    batch: int = 4
    objective: str = "ce"           # "ce" next-token cross-entropy | "kl" KL(p_fp32 || p_q)
    schedule: str = "cosine"        # cosine to min_lr_ratio*lr, or constant; after `warmup`
    warmup: int | None = None       # linear warmup steps (default 5 % of steps)
    min_lr_ratio: float = 0.0
    val_windows: int | None = 8     # held-out windows (first ones) when val_ids are given
    eval_every: int | None = None   # held-out evaluation period (default steps // 10)
    patience: int | None = None     # evaluations without improvement before stopping
    checkpoint_every: int | None = None  # default steps // 10
    seed: int = 0
    space: str = "native"           # "native" | "linear" (sasq.optim)
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    recompute: bool = False         # recompute each layer in backward (less memory)
    chunk_rows: int = losses.DEFAULT_CHUNK_ROWS
    pool: int | None = 256          # KL: batches from a fixed pool of windows, teacher cached
    select: str | None = None       # held-out loss that picks the kept parameters (None: the
                                    # objective's; "kl": fidelity, also for CE training)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.select not in (None,) + OBJECTIVES:
            raise ValueError(f"select must be None or one of {OBJECTIVES}, got {self.select!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        for name in ("steps", "seqlen", "batch"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be a positive integer, got {val!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        s = self.steps
        fill = dict(warmup=max(0, s // 20) if self.warmup is None else int(self.warmup),
                    eval_every=max(1, s // 10) if self.eval_every is None else self.eval_every,
                    checkpoint_every=(max(1, s // 10) if self.checkpoint_every is None
                                      else self.checkpoint_every))
        for k, v in fill.items():
            object.__setattr__(self, k, v)

    @property
    def val_objective(self) -> str:
        return self.select or self.objective

    def identity(self, val_windows: int | None, shapes: dict) -> dict:
        """What a checkpoint records and a resume must match."""
        extra = {} if self.val_objective == self.objective else {"select": self.val_objective}
        return dict(**extra, steps=int(self.steps), lr=float(self.lr), seqlen=int(self.seqlen),
                    batch=int(self.batch), objective=self.objective, schedule=self.schedule,
                    warmup=self.warmup, min_lr_ratio=float(self.min_lr_ratio), seed=int(self.seed),
                    space=self.space, betas=[float(b) for b in self.betas], eps=float(self.eps),
                    eval_every=int(self.eval_every), patience=self.patience,
                    val_windows=val_windows, shapes=shapes,
                    pool=self.pool if self.objective == "kl" else None)


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


def lr_at(step: int, steps: int, lr: float, schedule: str, warmup: int, min_lr_ratio: float) -> float:
    """Learning rate of update number `step` (0-based): linear warmup, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- losses of a step

class TeacherPool:
    """KL training data: a fixed pool of windows (a seeded random subset of the non-overlapping
    windows of the training data, at most `size`) whose FP32 teacher hidden states are computed
    on first use and kept, so the teacher runs once per window instead of once per step."""

    def __init__(self, train_ids, length: int, size: int, seed: int, teacher):
        wins = cut_windows(train_ids, length, None, "train_ids")
        pick = np.sort(np.random.default_rng(seed).permutation(len(wins))[:size])
        self.windows = np.ascontiguousarray(wins[pick])  # (n, T+1)
        self.teacher = teacher
        self.hidden: dict[int, np.ndarray] = {}

    def batch(self, rng, batch: int):
        """(row indices, (batch, T+1) windows)."""
        idx = rng.integers(0, len(self.windows), size=batch)
        return idx, self.windows[idx]

    def teacher_hidden(self, idx) -> np.ndarray:
        todo = sorted({int(i) for i in idx} - set(self.hidden))
        if todo:
            h = self.teacher.forward(self.windows[todo, :-1], return_hidden=True)
            self.hidden.update({i: h[j] for j, i in enumerate(todo)})
        return np.stack([self.hidden[int(i)] for i in idx])  # (B, T, C)


def _step_loss(qmodel, x, y, objective, teacher_hidden, teacher_head, cfg):
    """Forward with a tape, the loss and its gradient at the final hidden state (the logits are
    formed chunk by chunk inside the loss), backward into qmodel.grads."""
    tape = qmodel.forward_tape(x, recompute=cfg.recompute, compute_logits=False)
    student = (tape.hidden, qmodel.lm_head)
    if objective == "ce":
        loss, dhidden = losses.ce_loss_and_grad(student, y, cfg.chunk_rows)
    else:
        loss, dhidden = losses.kl_loss_and_grad(student, (teacher_hidden, teacher_head),
                                                cfg.chunk_rows)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss} (lr too high?)")
    qmodel.backward(tape, dhidden=dhidden)
    return loss


def _val_loss(qmodel, windows, objective, teacher, teacher_cache, batch, chunk_rows) -> float:
    """Mean held-out loss (TrainConfig.val_objective) over fixed windows (n, T+1)."""
    total, rows = 0.0, 0
    for b0 in range(0, windows.shape[0], batch):
        w = windows[b0:b0 + batch]
        x, y = w[:, :-1], w[:, 1:]
        h = qmodel.forward(x, return_hidden=True)  # (b, T, C)
        if objective == "ce":
            loss = losses.ce_forward((h, qmodel.lm_head), y, chunk_rows)
        else:
            if b0 not in teacher_cache:
                teacher_cache[b0] = teacher.forward(x, return_hidden=True)
            loss = losses.kl_forward((h, qmodel.lm_head), (teacher_cache[b0], teacher.lm_head),
                                     chunk_rows)
        total += loss * x.size
        rows += x.size
    return total / rows


# --------------------------------------------------------------------------- the loop

def train_scales(qmodel, train_ids, steps: int | None = None, *, config: TrainConfig | None = None,
                 val_ids=None, teacher=None, checkpoint=None, resume: bool = False,
                 progress: bool = True, stop_at: int | None = None, callback=None,
                 **settings) -> TrainResult:
    """Train qmodel.params in place with Adam; returns a TrainResult.

    Settings: a TrainConfig, or its fields as keywords (steps, lr, seqlen, batch, objective,
    schedule, warmup, ... see TrainConfig). train_ids: 1-D token stream or (n, L) windows
    (L >= seqlen + 1); each step samples `batch` windows of seqlen + 1 tokens. objective "kl" uses
    `teacher` (default qmodel.model), its logits computed on the fly in row chunks. With val_ids,
    the held-out loss (the objective's, or `select`'s; first `val_windows` windows) is measured before training,
    every `eval_every` steps and at the end; the best parameters are kept and loaded back at the
    end; `patience` evaluations without improvement stop early. `checkpoint` (a .npz path) is
    written atomically every `checkpoint_every` steps and at the end; resume=True continues from
    it if it exists (a finished checkpoint returns at once). `stop_at` ends the call after that
    global step (the checkpoint is written first), and `callback(step, info) -> bool` runs after
    every step; True stops. Both simulate interruptions in tests.
    """
    if config is None:
        config = TrainConfig(steps=steps, **settings)
    elif steps is not None or settings:
        config = dataclasses.replace(config, **({"steps": steps} if steps else {}), **settings)
    cfg = config
    if not getattr(qmodel, "params", None):
        raise ValueError("qmodel has no trainable params (is the plan FP32 or dynamic?)")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    check_seqlen(qmodel, cfg.seqlen)
    train_ids = as_token_ids(train_ids, "train_ids")
    val = (cut_windows(val_ids, cfg.seqlen + 1, cfg.val_windows, "val_ids")
           if val_ids is not None else None)
    if "kl" in (cfg.objective, cfg.val_objective) and teacher is None:
        teacher = getattr(qmodel, "model", None)
        if teacher is None:
            raise ValueError("the KL objective (or selection) needs a teacher (qmodel.model is missing)")

    space = ParamSpace(qmodel, cfg.space)
    keys = sorted(qmodel.params)
    shapes = {k: list(qmodel.params[k].shape) for k in keys}
    identity = cfg.identity(None if val is None else int(val.shape[0]), shapes)
    # what the parameters mean: a checkpoint of another plan or rotation must not be resumed
    plan = getattr(qmodel, "plan", None)
    identity["plan"] = None if plan is None else json.loads(json.dumps(plan.to_dict()))
    identity["rotation_version"] = ROTATION_VERSION if plan is not None and plan.rotate else None

    # ---- state: fresh or from the checkpoint
    rng = np.random.default_rng(cfg.seed)
    opt = Adam(space.get(), cfg.betas, cfg.eps)
    best = None
    st = dict(version=CHECKPOINT_VERSION, keys=keys, config=identity, step=0, loss_ema=None,
              best_val=None, best_step=None, initial_val=None, bad_evals=0, stopped_early=False,
              history=[], val_history=[])
    resumed_from = None
    if resume and Path(checkpoint).exists():
        expect = {k: (qmodel.params[k].shape, opt.var[k].dtype) for k in keys}
        st_l, arr = load_checkpoint(checkpoint, expect)
        if st_l.get("config") != identity:
            old = st_l.get("config") if isinstance(st_l.get("config"), dict) else {}
            diff = sorted(k for k in identity if old.get(k) != identity[k])
            raise ValueError(f"{checkpoint}: checkpoint was written with different settings "
                             f"({', '.join(diff)})")
        st = st_l
        opt.var, opt.m, opt.v = arr["var"], arr["m"], arr["v"]
        best = arr["best"] or None
        rng.bit_generator.state = st.pop("rng")
        space.floors.update(arr["floor"])
        space.put(opt.var)
        resumed_from = st["step"]

    teacher_cache: dict = {}
    pool = (TeacherPool(train_ids, cfg.seqlen + 1, cfg.pool, cfg.seed, teacher)
            if cfg.objective == "kl" and cfg.pool else None)
    done = st["step"] >= cfg.steps or st["stopped_early"]

    def evaluate(step):
        nonlocal best
        vl = _val_loss(qmodel, val, cfg.val_objective, teacher, teacher_cache, cfg.batch,
                       cfg.chunk_rows)
        st["val_history"].append({"step": step, "val": vl})
        if step == 0:
            st["initial_val"] = vl
        if st["best_val"] is None or vl < st["best_val"]:
            st["best_val"], st["best_step"], st["bad_evals"] = vl, step, 0
            best = {k: a.copy() for k, a in opt.var.items()}
        else:
            st["bad_evals"] += 1
        return vl

    def save():
        if checkpoint is not None:
            save_checkpoint(checkpoint, {**st, "rng": rng.bit_generator.state},
                            {"var": opt.var, "m": opt.m, "v": opt.v, "best": best,
                             "floor": space.floors})

    if val is not None and st["step"] == 0 and not st["val_history"]:
        evaluate(0)

    t0 = time.perf_counter()
    n_run = 0
    bar = None
    if not done:
        from sasq.progress import bar as progress_bar
        bar = progress_bar(total=cfg.steps, initial=st["step"], desc=f"train scales ({cfg.objective})",
                           disable=not progress, unit="step")
    try:
        while not done:
            step = st["step"]
            cur_lr = lr_at(step, cfg.steps, cfg.lr, cfg.schedule, cfg.warmup, cfg.min_lr_ratio)
            th = None
            if pool is not None:
                idx, w = pool.batch(rng, cfg.batch)  # (B, T+1)
                th = pool.teacher_hidden(idx)
            else:
                w = sample_batch(rng, train_ids, cfg.batch, cfg.seqlen + 1)  # (B, T+1)
                if cfg.objective == "kl":
                    th = teacher.forward(w[:, :-1], return_hidden=True)  # (B, T, C)
            qmodel.zero_grad()
            try:
                loss = _step_loss(qmodel, w[:, :-1], w[:, 1:], cfg.objective, th,
                                  getattr(teacher, "lm_head", None), cfg)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {step} (lr {cur_lr:g})") from None
            t = step + 1
            opt.step(space.grads(opt.var), cur_lr, t)
            space.project(opt.var)
            space.put(opt.var)
            st["step"] = t
            st["loss_ema"] = loss if st["loss_ema"] is None else 0.9 * st["loss_ema"] + 0.1 * loss
            st["history"].append({"step": t, "loss": loss, "lr": cur_lr})
            n_run += 1
            if val is not None and (t % cfg.eval_every == 0 or t == cfg.steps):
                evaluate(t)
                if cfg.patience is not None and st["bad_evals"] >= cfg.patience:
                    st["stopped_early"] = True
            done = t >= cfg.steps or st["stopped_early"]
            if t % cfg.checkpoint_every == 0 or done:
                save()
            if bar is not None:
                post = {"loss": f"{st['loss_ema']:.4f}"}
                if st["best_val"] is not None:
                    post["val"] = f"{st['best_val']:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            info = {"loss": loss, "lr": cur_lr, "loss_ema": st["loss_ema"]}
            if callback is not None and callback(t, info):
                save()
                break
            if stop_at is not None and t >= stop_at and not done:
                save()
                break
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    finished = st["step"] >= cfg.steps or st["stopped_early"]
    if finished and best is not None:
        # Keep the best held-out parameters (the final ones when they are the best).
        for k in keys:
            opt.var[k][...] = best[k]
        space.put(opt.var)
    return TrainResult(
        steps=st["step"], final_loss=st["loss_ema"], best_val=st["best_val"],
        best_step=st["best_step"], initial_val=st["initial_val"],
        stopped_early=st["stopped_early"], resumed_from=resumed_from, seconds=seconds,
        seconds_per_step=seconds / n_run if n_run else None, history=st["history"],
        val_history=st["val_history"])
