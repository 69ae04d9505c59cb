"""The runner: `run_experiment(cfg)` loads a model, prepares the data, evaluates FP32 and every
(method, bits, objective) cell of the catalogue (sasq.methods) on every evaluation set, and
writes results.json + results.md (sasq.results) under `cfg.out`.

Data: a training text split into train/val (the last val_fraction held out for early stopping),
or data-free samples from the FP32 model; calibration windows are drawn from the training part.
Evaluation sets: the eval text (if given) and, always, control (b): text sampled from the FP32
model itself with a seed different from the training samples ("own-domain").

The JSON is rewritten atomically after every cell; a rerun with the same settings skips the cells
it already holds (and training itself resumes from its per-cell checkpoint), so an interrupted
run continues where it stopped.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sasq import corpora, datafree
from sasq.atomic import atomic_write
from sasq.data import check_seqlen, cut_windows, split_stream, tokenize_corpus
from sasq.eval import Reference
from sasq.methods import (BITLESS, DEFAULT_BITS, METHODS, TRAINED, applies, describe, method,
                          parse_bits, row_label)
from sasq.rotate import ROTATION_VERSION, rotate_model
from sasq.start import choose_start
from sasq.results import (RESULTS_VERSION, Results, _fmt_ppl, cell_key, check_data, check_identity,
                           data_fingerprint)

OWN_DOMAIN = "own-domain (FP32 samples)"
# Trained cells keep the parameters (the start included) with the lowest held-out KL to FP32,
# whatever they were trained on: SASQ is never less faithful than its start there.
SELECT = "kl"
EVAL_BATCH = 4  # windows per perplexity forward (speed only; the numbers do not depend on it)
IDENTITY_FIELDS = ("model", "train", "eval", "steps", "lr", "seqlen", "eval_seqlen", "batch", "schedule",
                   "calib_windows",
                   "val_fraction", "val_windows", "evals_during_training", "eval_windows", "own_windows",
                   "datafree_windows", "temperature", "seed")


@dataclass
class ExperimentConfig:
    model: str | None = None  # HF dir or .gguf; None = bundled stories260K
    train: str | None = None  # training text; None = data-free mode
    eval: str | None = None  # evaluation text (reported split)
    bits: tuple = DEFAULT_BITS
    methods: tuple = METHODS
    objectives: tuple = ("ce", "kl")
    steps: int = 100
    lr: float = 3e-2
    seqlen: int = 512             # training, calibration and held-out windows
    eval_seqlen: int | None = None  # evaluation windows (default: seqlen)
    batch: int = 4
    schedule: str = "cosine"
    calib_windows: int = 16
    val_fraction: float = 0.1
    val_windows: int = 8  # held-out windows: early stopping and the choice of the SASQ start
    evals_during_training: int = 4  # held-out evaluations per training run (early stopping)
    eval_windows: int | None = None  # cap on eval-text windows (None = all)
    own_windows: int = 32  # own-domain evaluation windows
    datafree_windows: int = 128  # data-free training windows (of seqlen + 1 tokens)
    temperature: float = 1.0
    seed: int = 0
    out: str | None = None
    progress: bool = True

    def identity(self) -> dict:
        """Settings that change numbers: a resumed run must match them exactly."""
        d = asdict(self)
        return {k: d[k] for k in IDENTITY_FIELDS}


def _cached_samples(path: Path, model, n, length, seed, temperature, progress) -> np.ndarray:
    """Data-free windows, cached in the results dir (sampling is the slow part of a rerun)."""
    if path.exists():
        a = np.load(path)
        if a.shape == (n, length):
            return a
    a = datafree.sample_windows(model, n, length, temperature=temperature, seed=seed, progress=progress)
    with atomic_write(path, "wb") as f:
        np.save(f, a)
    return a


def default_out_dir(name: str | None = None) -> Path:
    return Path("results") / (name or time.strftime("%Y%m%d-%H%M%S"))


@dataclass
class Data:
    """Everything a run reads: training stream/windows, held-out part, calibration windows, and
    the evaluation sets (name -> 1-D token stream)."""
    train_ids: np.ndarray
    val_ids: np.ndarray | None
    calib: np.ndarray          # (n_calib, seqlen)
    evals: dict
    trained_on: str            # what the table says the scales were trained/calibrated on
    corpora: dict = field(default_factory=dict)  # eval name -> {"corpus", "source", "text_sha256"}


def prepare_data(cfg, model, out: Path, log) -> Data:
    seqlen = cfg.seqlen
    if cfg.train:
        tc = corpora.resolve(cfg.train)  # a name (wikitext2:valid) or a text file
        ids = tokenize_corpus(model.tokenizer, tc.text)
        if len(ids) - int(len(ids) * cfg.val_fraction) < 2 * (seqlen + 1):
            raise ValueError(f"{cfg.train}: {len(ids)} tokens is too little text for seqlen {seqlen}")
        train_ids, val_ids = split_stream(ids, cfg.val_fraction, seqlen + 1)
        trained_on = f"{tc.label} (first {100 - cfg.val_fraction * 100:.0f}%)"
    else:
        log(f"data-free mode: sampling {cfg.datafree_windows} training windows from the FP32 model "
            f"(seed {datafree.TRAIN_SEED})")
        samples = _cached_samples(out / "datafree_train.npy", model, cfg.datafree_windows, seqlen + 1,
                                  datafree.TRAIN_SEED, cfg.temperature, cfg.progress)
        n_val = max(1, int(round(samples.shape[0] * cfg.val_fraction))) if samples.shape[0] > 1 else 0
        train_ids = samples[: samples.shape[0] - n_val]
        val_ids = samples[samples.shape[0] - n_val:] if n_val else None
        trained_on = f"data-free samples (seed {datafree.TRAIN_SEED})"
    calib = cut_windows(train_ids, seqlen)
    rng = np.random.default_rng(cfg.seed)
    calib = calib[np.sort(rng.permutation(calib.shape[0])[: cfg.calib_windows])]  # (n_calib, seqlen)

    evals: dict[str, np.ndarray] = {}
    info = {}
    if cfg.eval:
        ec = corpora.resolve(cfg.eval)
        evals[ec.key] = tokenize_corpus(model.tokenizer, ec.text)
        info[ec.key] = {"corpus": ec.name or ec.key, "source": ec.source, "text_sha256": ec.sha256}
    log(f"own-domain eval: sampling {cfg.own_windows} windows (seed {datafree.EVAL_SEED})")
    own = _cached_samples(out / "datafree_eval.npy", model, cfg.own_windows, cfg.eval_seqlen or seqlen,
                          datafree.EVAL_SEED, cfg.temperature, cfg.progress)
    evals[OWN_DOMAIN] = own.reshape(-1)
    return Data(train_ids, val_ids, calib, evals, trained_on, info)


# --------------------------------------------------------------------------- the run

def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    import sasq
    from sasq.io import default_model_dir
    from sasq.train import train_scales

    bits = [b.upper() for b in cfg.bits]
    for b in bits:
        parse_bits(b)
    for key in cfg.methods:
        method(key)  # ValueError naming the known methods
    for o in cfg.objectives:
        if o not in ("ce", "kl"):
            raise ValueError(f"objective must be ce or kl, got {o!r}")
    if cfg.steps < 1 or cfg.seqlen < 2 or cfg.batch < 1:
        raise ValueError("steps, batch must be >= 1 and seqlen >= 2")

    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    model = sasq.load(model_dir)
    if model.tokenizer is None and (cfg.train or cfg.eval):
        raise ValueError(f"{model_dir}: no tokenizer files, cannot tokenize text")
    check_seqlen(model, cfg.seqlen, "--seqlen")
    eval_seqlen = check_seqlen(model, cfg.eval_seqlen or cfg.seqlen, "--eval-seqlen")
    out = Path(cfg.out) if cfg.out else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    seqlen = cfg.seqlen
    check_identity(out / "results.json", cfg.identity())  # refuse before sampling or tokenizing
    data = prepare_data(cfg, model, out, log)
    evals, eval_names, trained_on = data.evals, list(data.evals), data.trained_on
    fingerprint = data_fingerprint(data.train_ids, data.val_ids, data.calib, evals, model)
    check_data(out / "results.json", fingerprint)  # before any stored row or baseline is reused

    meta = {
        "model": str(model_dir), "model_name": model_dir.name if model_dir.name != "hf" else model_dir.parent.name,
        "train": cfg.train, "eval": cfg.eval, "trained_on": trained_on, "seqlen": eval_seqlen,
        "train_seqlen": seqlen,
        "bits": bits, "evals": eval_names, "identity": cfg.identity(),
        "machine": platform.machine(), "numpy": np.__version__, "data": fingerprint,
    }
    results = Results(out, meta)

    # ---- FP32 references (hidden states of every eval window, and of the held-out windows that
    # choose SASQ's start), computed once and kept in the run folder
    refs = {}
    for k, name in enumerate(eval_names):
        cap = cfg.eval_windows if name != OWN_DOMAIN else None
        refs[name] = Reference.compute(model, evals[name], eval_seqlen, cap, EVAL_BATCH, cfg.progress,
                                       path=out / f"reference_{k}.npz")
    heldout = None
    if data.val_ids is not None:
        heldout = Reference.compute(model, cut_windows(data.val_ids, seqlen), seqlen, cfg.val_windows,
                                    EVAL_BATCH, cfg.progress, path=out / "reference_heldout.npz")

    def score(qm, name):
        return sasq.perplexity(qm, refs[name].windows, eval_seqlen, batch_size=EVAL_BATCH,
                               progress=cfg.progress, reference=refs[name])

    fp32 = results.meta.get("fp32", {})
    for name in eval_names:
        if name not in fp32:
            t0 = time.perf_counter()
            r = score(model, name)
            fp32[name] = {"ppl": float(r.ppl), "nll": float(r.nll), "n_windows": int(r.n_windows),
                          "available_windows": int(len(evals[name]) // eval_seqlen),
                          "seconds": time.perf_counter() - t0}
            log(f"FP32 on {name}: PPL {r.ppl:.3f} ({r.n_windows} windows x {eval_seqlen})")
    results.meta["fp32"] = fp32
    results.meta["evals"] = eval_names
    # What each number was measured on, for comparisons with other tools (sasq.external).
    from sasq.external import make_protocol, tokens_sha256
    bos = "once" if getattr(model.tokenizer, "add_bos", False) else "none"
    results.meta["protocols"] = {
        name: make_protocol(corpus=data.corpora.get(name, {}).get("corpus", name),
                            text_sha256=data.corpora.get(name, {}).get("text_sha256"),
                            tokens_sha256=tokens_sha256(evals[name]), seqlen=eval_seqlen,
                            n_windows=refs[name].windows.shape[0],
                            bos="per_window" if name == OWN_DOMAIN else bos)
        for name in eval_names}
    if "fp32" in cfg.methods:
        results.add([_row("fp32", "-", "-", None, name, fp32[name]["ppl"], fp32[name]["ppl"], 0.0, 1.0,
                          fp32[name]["n_windows"], "-", {}, None) for name in eval_names])
    results.save()

    # ---- every other cell
    # Bit-config major order: an interrupted run has whole bit configs (all methods side by side).
    cells = []
    for b in ["-"] + bits:
        for key in cfg.methods:
            if key == "fp32" or (key in BITLESS) != (b == "-"):
                continue
            if b != "-" and not applies(key, *parse_bits(b)):
                continue  # static rows at A16 (float activations)
            for o in (list(cfg.objectives) if key in TRAINED else ["-"]):
                cells.append((key, b, o))
    rotated = {}  # the rotated model, built once per R1 seed
    ckpt_dir = out / "checkpoints"
    for i, (key, b, obj) in enumerate(cells):
        w_bits, a_bits = parse_bits(b) if b != "-" else (None, None)
        if results.has_cell(key, b, obj, eval_names, recipe=_recipe(method(key).plan(w_bits, a_bits), key)):
            log(f"[{i + 1}/{len(cells)}] {row_label(key, parse_bits(b)[1] if b != '-' else 8)} {b} {obj}: "
                f"already in {results.json_path.name}, skipped")
            continue
        m = method(key)
        plan = m.plan(w_bits, a_bits)
        t0 = time.perf_counter()
        base = model
        if plan is not None and plan.rotate:
            if plan.rotate_seed not in rotated:
                rotated[plan.rotate_seed] = rotate_model(model, seed=plan.rotate_seed)
            base = rotated[plan.rotate_seed]
        qm = sasq.quantize(base, plan)
        info = {}
        if m.calibrate == "best":
            if heldout is None:
                raise ValueError("choosing SASQ's start needs held-out windows (val_fraction > 0)")
            start = choose_start(qm, data.calib, heldout, progress=cfg.progress, log=log)
            info.update(start=start["chosen"], start_kl=start["kl"])
        elif m.calibrate is not None:
            sasq.calibrate(qm, data.calib, seqlen=seqlen, method=m.calibrate, progress=cfg.progress)
        if m.train:
            ck = ckpt_dir / (cell_key(key, b, obj).replace("|", "_") + ".npz")
            _say_resume(ck, cfg.steps, f"[{i + 1}/{len(cells)}] {row_label(key, a_bits or 8)} {b} {obj}", log)
            tr = train_scales(qm, data.train_ids, steps=cfg.steps, lr=cfg.lr, seqlen=seqlen, batch=cfg.batch,
                              objective=obj, select=SELECT, schedule=cfg.schedule, val_ids=data.val_ids,
                              val_windows=cfg.val_windows, checkpoint=ck, resume=True, seed=cfg.seed,
                              eval_every=max(1, cfg.steps // max(1, cfg.evals_during_training)),
                              progress=cfg.progress)
            info.update(train_steps=tr.steps, initial_val=tr.initial_val, best_val=tr.best_val,
                        best_step=tr.best_step, final_train_loss=tr.final_loss,
                        seconds_per_step=tr.seconds_per_step,
                        history=[[h["step"], h["loss"]] for h in tr.history],
                        val_history=[[h["step"], h["val"]] for h in tr.val_history])
        prep = time.perf_counter() - t0
        rows = []
        for name in eval_names:
            r = score(qm, name)
            rows.append(_row(key, b, obj, plan, name, float(r.ppl), fp32[name]["ppl"], r.kl, r.top1,
                             int(r.n_windows),
                             trained_on if m.train else
                             (f"calib: {trained_on}" if m.calibrate else "-"), info, prep))
        results.add(rows)
        summary = ", ".join(f"{r['eval']}: PPL {_fmt_ppl(r['ppl'])} KL {r['kl']:.4f} top-1 "
                            f"{100 * r['top1']:.1f}%" for r in rows)
        log(f"[{i + 1}/{len(cells)}] {row_label(key, a_bits)} {b} {obj}: {summary} "
            f"({time.perf_counter() - t0:.0f} s)")
    return {"version": RESULTS_VERSION, "meta": results.meta, "rows": results.rows,
            "dir": str(out)}


def _say_resume(ck: Path, steps: int, what: str, log) -> None:
    """Tell the user a cell's training is picked up from its checkpoint (not started over)."""
    if not ck.exists():
        return
    from sasq.optim import load_checkpoint
    try:
        step = int(load_checkpoint(ck)[0].get("step", 0))
    except (ValueError, TypeError):
        return  # train_scales reports an unreadable checkpoint with its own message
    log(f"{what}: resuming training from {ck.name} at step {step} of {steps}" if step < steps else
        f"{what}: training finished in {ck.name} ({step} steps); evaluating")


def _recipe(plan, key: str | None = None) -> dict | None:
    """What a cell computes beyond its key: the plan, the rotation code's version for rotated
    plans, and how the catalogue method calibrates and trains it (a resumed run must not keep
    cells computed otherwise)."""
    if plan is None:
        return None
    r = {"plan": json.loads(json.dumps(plan.to_dict())),
         "rotation_version": ROTATION_VERSION if plan.rotate else None}
    if key is not None:
        r.update(calibrate=method(key).calibrate, train=method(key).train)
        if method(key).train:
            r["select"] = SELECT
    return r


def _row(key, bits, objective, plan, eval_name, ppl, fp32_ppl, kl, top1, n_windows, trained_on,
         info, prep_s):
    a_bits = parse_bits(bits)[1] if bits != "-" else 8
    return {"method": key, "label": row_label(key, a_bits), "bits": bits, "objective": objective,
            "recipe": _recipe(plan, key),
            **describe(key, plan), "trained_on": trained_on, "eval": eval_name, "ppl": ppl,
            "delta": (ppl / fp32_ppl - 1.0) if key != "fp32" else None, "kl": kl, "top1": top1,
            "n_windows": n_windows, "prep_seconds": prep_s, **info}
