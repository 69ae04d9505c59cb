"""The results table: methods x bit configurations x evaluation sets, with the honesty controls.

`run_experiment(cfg)` loads a model, prepares the data (a training text split into train/val,
or data-free samples from the FP32 model), evaluates FP32 and every (method, bits, objective)
cell on every evaluation set, and writes `results.json` + `results.md` under `cfg.out`. The
JSON is rewritten atomically after every cell; a rerun with the same settings skips the cells
it already holds (and training itself resumes from its per-cell checkpoint), so an interrupted
run continues where it stopped.

Methods (each one QuantPlan away, evaluated through the same perplexity code path):
  fp32            the frozen model, no quantization
  adapted_fp32    control (a): the same sites/data/steps/optimizer training per-channel gains and
                  clip thresholds with no rounding (how much is domain fit, not quantization)
  static_tensor   static per-tensor absmax (the paper's PTQ init, mean of per-window absmax)
  static_channel  static per-channel absmax PTQ, folded into the weights (deployable)
  dynamic_token   dynamic per-token absmax computed at run time
  smoothquant     SmoothQuant (alpha 0.5) with static per-tensor scales
  sasq            SASQ: per-channel folded scales from the PTQ init, trained (hard clamp)
  sasq_trunc      SASQ with the adaptive truncation before the quantizer
Evaluation sets: the eval text (if given) and, always, control (b): text sampled from the FP32
model itself with a seed different from the training samples ("own-domain").
"""
from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sasq import datafree
from sasq.atomic import atomic_write

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
OWN_DOMAIN = "own-domain (FP32 samples)"
SMOOTHQUANT_ALPHA = 0.5
RESULTS_VERSION = 1
EVAL_BATCH = 4  # windows per perplexity forward (speed only; the numbers do not depend on it)
IDENTITY_FIELDS = ("model", "train", "eval", "steps", "lr", "seqlen", "batch", "schedule", "calib_windows",
                   "val_fraction", "val_windows", "evals_during_training", "eval_windows", "own_windows",
                   "datafree_windows", "temperature", "seed")


def parse_bits(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", spec.strip())
    if not m:
        raise ValueError(f"bit config {spec!r} is not of the form W<bits>A<bits> (e.g. W8A8)")
    w, a = int(m.group(1)), int(m.group(2))
    if not (2 <= w <= 8 and 2 <= a <= 8):
        raise ValueError(f"bit config {spec!r}: bits must be between 2 and 8")
    return w, a


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
    seqlen: int = 512
    batch: int = 4
    schedule: str = "cosine"
    calib_windows: int = 16
    val_fraction: float = 0.1
    val_windows: int = 4
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


# --------------------------------------------------------------------------- plans

def make_plan(method: str, w_bits: int | None, a_bits: int | None):
    from sasq.quant import QuantPlan
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


# --------------------------------------------------------------------------- results file

def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def cell_key(method: str, bits: str, objective: str) -> str:
    return f"{method}|{bits}|{objective}"


def row_key(row: dict) -> str:
    return cell_key(row["method"], row["bits"], row["objective"]) + "|" + row["eval"]


class Results:
    """results.json (meta + long-format rows) and its Markdown rendering, atomically rewritten."""

    def __init__(self, out_dir: Path, meta: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.dir / "results.json"
        self.md_path = self.dir / "results.md"
        self.meta = meta
        self.rows: list[dict] = []
        if self.json_path.exists():
            old = load_results(self.json_path)
            if old["meta"].get("identity") != meta.get("identity"):
                a, b = old["meta"].get("identity", {}), meta.get("identity", {})
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(f"{self.json_path} holds results of different settings "
                                 f"({', '.join(diff)}); use another --out")
            self.rows = old["rows"]
            self.meta = {**old["meta"], **meta}

    def keys(self) -> set[str]:
        return {row_key(r) for r in self.rows}

    def has_cell(self, method, bits, objective, evals) -> bool:
        ks = self.keys()
        return all(cell_key(method, bits, objective) + "|" + e in ks for e in evals)

    def add(self, rows: list[dict]) -> None:
        have = self.keys()
        self.rows.extend(r for r in rows if row_key(r) not in have)
        self.save()

    def save(self) -> None:
        doc = {"version": RESULTS_VERSION, "meta": self.meta, "rows": self.rows}
        _atomic_write_text(self.json_path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
        _atomic_write_text(self.md_path, render_markdown(doc))


def load_results(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable results file ({e})") from None
    if doc.get("version") != RESULTS_VERSION or "rows" not in doc or "meta" not in doc:
        raise ValueError(f"{path}: not a sasq results file of version {RESULTS_VERSION}")
    return doc


def _fmt_ppl(x):
    if x is None or not np.isfinite(x):
        return "inf"
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def render_markdown(doc: dict) -> str:
    """One line per (method, bits, objective); the eval sets side by side."""
    meta, rows = doc["meta"], doc["rows"]
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    fp32 = meta.get("fp32", {})
    lines = [f"# sasq results: {meta.get('model_name', '?')}", ""]
    lines.append(f"- scales trained/calibrated on: **{meta.get('trained_on', '?')}**; "
                 f"steps {meta.get('identity', {}).get('steps')}, lr {meta.get('identity', {}).get('lr')}, "
                 f"batch {meta.get('identity', {}).get('batch')} x seqlen {meta.get('seqlen')}")
    for e in evals:
        f = fp32.get(e, {})
        lines.append(f"- eval **{e}**: FP32 PPL {_fmt_ppl(f.get('ppl'))}, "
                     f"{f.get('n_windows', '?')} windows x {meta.get('seqlen')} tokens")
    lines.append("- delta = PPL / FP32 PPL - 1 on the same eval set; 'form' says whether a per-channel "
                 "number is deployable (folded) or not")
    lines.append("")
    head = ["method", "W/A", "granularity", "form", "static/dynamic", "objective", "trained on"]
    for e in evals:
        head += [f"PPL {e}", "delta"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    cells: dict = {}
    order = []
    for r in rows:  # the training split is part of a line's identity (merged tables)
        k = cell_key(r["method"], r["bits"], r["objective"]) + "|" + str(r.get("trained_on"))
        if k not in cells:
            cells[k] = {}
            order.append(k)
        cells[k][r["eval"]] = r
    method_rank = {m: i for i, m in enumerate(METHODS)}
    bits_rank = {b: i for i, b in enumerate(meta.get("bits", []))}
    order.sort(key=lambda k: (bits_rank.get(k.split("|")[1], -1), method_rank.get(k.split("|")[0], 99),
                              k.split("|")[2], k.split("|", 3)[3]))
    for k in order:
        c = cells[k]
        r0 = next(iter(c.values()))
        line = [METHOD_LABELS.get(r0["method"], r0["method"]), r0["bits"], r0["granularity"], r0["form"],
                r0["mode"], r0["objective"], r0["trained_on"]]
        for e in evals:
            r = c.get(e)
            if r is None:
                line += ["", ""]
            else:
                d = r.get("delta")
                line += [_fmt_ppl(r["ppl"]), "-" if d is None else f"{d * 100:+.1f}%"]
        lines.append("| " + " | ".join(line) + " |")
    lines.append("")
    lines.append(f"## Compact view (cells: PPL on {' / '.join(evals)})")
    lines.append("")
    lines.append(render_compact(doc))
    return "\n".join(lines)


# --------------------------------------------------------------------------- data

def render_compact(doc: dict) -> str:
    """Pivot: one line per (method, objective, training split), one column per bit config,
    each cell "PPL eval-1 / PPL eval-2 / ..." in the order of meta["evals"]."""
    meta, rows = doc["meta"], doc["rows"]
    evals = meta.get("evals", sorted({r["eval"] for r in rows}))
    bits = list(meta.get("bits", []))
    if any(r["bits"] == "-" for r in rows):
        bits = ["-"] + bits
    lines_ = {}
    for r in rows:
        k = (r["method"], r["objective"], r["trained_on"])
        lines_.setdefault(k, {}).setdefault(r["bits"], {})[r["eval"]] = r["ppl"]
    rank = {m: i for i, m in enumerate(METHODS)}
    out = ["| method | obj | trained on | " + " | ".join("no quant" if b == "-" else b for b in bits) + " |",
           "|" + "---|" * (3 + len(bits))]
    for k in sorted(lines_, key=lambda k: (rank.get(k[0], 99), k[1], k[2])):
        cells = []
        for b in bits:
            c = lines_[k].get(b)
            cells.append("" if c is None else " / ".join(_fmt_ppl(c.get(e)) for e in evals))
        out.append(f"| {METHOD_LABELS.get(k[0], k[0])} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _read_text(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    return p.read_text(encoding="utf-8")


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


# --------------------------------------------------------------------------- the run

def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    import sasq
    from sasq.eval import tokenize_corpus
    from sasq.io import default_model_dir
    from sasq.train import train_scales

    bits = [b.upper() for b in cfg.bits]
    for b in bits:
        parse_bits(b)
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for o in cfg.objectives:
        if o not in ("ce", "kl"):
            raise ValueError(f"objective must be ce or kl, got {o!r}")
    if cfg.steps < 1 or cfg.seqlen < 2 or cfg.batch < 1:
        raise ValueError("steps, batch must be >= 1 and seqlen >= 2")

    model_dir = Path(cfg.model) if cfg.model else default_model_dir()
    model = sasq.load(model_dir)
    if model.tokenizer is None and (cfg.train or cfg.eval):
        raise ValueError(f"{model_dir}: no tokenizer files, cannot tokenize text")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.seqlen > max_pos:
        raise ValueError(f"--seqlen {cfg.seqlen} exceeds the model's max_position_embeddings {max_pos}")
    out = Path(cfg.out) if cfg.out else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    seqlen = cfg.seqlen

    # ---- training data: text (split into train/val) or data-free samples
    if cfg.train:
        ids = tokenize_corpus(model.tokenizer, _read_text(cfg.train))
        n_val = int(len(ids) * cfg.val_fraction)
        if len(ids) - n_val < 2 * (seqlen + 1):
            raise ValueError(f"{cfg.train}: {len(ids)} tokens is too little text for seqlen {seqlen}")
        train_ids, val_ids = ids[: len(ids) - n_val], (ids[len(ids) - n_val:] if n_val > seqlen + 1 else None)
        trained_on = f"{Path(cfg.train).name} (first {100 - cfg.val_fraction * 100:.0f}%)"
        calib = train_ids[: (len(train_ids) // seqlen) * seqlen].reshape(-1, seqlen)
    else:
        log(f"data-free mode: sampling {cfg.datafree_windows} training windows from the FP32 model "
            f"(seed {datafree.TRAIN_SEED})")
        samples = _cached_samples(out / "datafree_train.npy", model, cfg.datafree_windows, seqlen + 1,
                                  datafree.TRAIN_SEED, cfg.temperature, cfg.progress)
        n_val = max(1, int(round(samples.shape[0] * cfg.val_fraction))) if samples.shape[0] > 1 else 0
        train_ids = samples[: samples.shape[0] - n_val]
        val_ids = samples[samples.shape[0] - n_val:] if n_val else None
        trained_on = f"data-free samples (seed {datafree.TRAIN_SEED})"
        calib = train_ids[:, :seqlen]
    rng = np.random.default_rng(cfg.seed)
    calib = calib[np.sort(rng.permutation(calib.shape[0])[: cfg.calib_windows])]  # (n_calib, seqlen)

    # ---- evaluation sets: name -> 1-D token stream cut into seqlen windows by perplexity()
    evals: dict[str, np.ndarray] = {}
    if cfg.eval:
        evals[Path(cfg.eval).name] = tokenize_corpus(model.tokenizer, _read_text(cfg.eval))
    log(f"own-domain eval: sampling {cfg.own_windows} windows (seed {datafree.EVAL_SEED})")
    own = _cached_samples(out / "datafree_eval.npy", model, cfg.own_windows, seqlen,
                          datafree.EVAL_SEED, cfg.temperature, cfg.progress)
    evals[OWN_DOMAIN] = own.reshape(-1)
    eval_names = list(evals)

    meta = {
        "model": str(model_dir), "model_name": model_dir.name if model_dir.name != "hf" else model_dir.parent.name,
        "train": cfg.train, "eval": cfg.eval, "trained_on": trained_on, "seqlen": seqlen,
        "bits": bits, "evals": eval_names, "identity": cfg.identity(),
        "machine": platform.machine(), "numpy": np.__version__,
    }
    results = Results(out, meta)

    def ppl(qm, name):
        r = sasq.perplexity(qm, evals[name], seqlen, batch_size=EVAL_BATCH,
                            max_windows=cfg.eval_windows if name != OWN_DOMAIN else None,
                            progress=cfg.progress)
        return r

    # ---- FP32 reference, always first
    fp32 = results.meta.get("fp32", {})
    for name in eval_names:
        if name not in fp32:
            t0 = time.perf_counter()
            r = ppl(model, name)
            fp32[name] = {"ppl": float(r.ppl), "nll": float(r.nll), "n_windows": int(r.n_windows),
                          "seconds": time.perf_counter() - t0}
            log(f"FP32 on {name}: PPL {r.ppl:.3f} ({r.n_windows} windows x {seqlen})")
    results.meta["fp32"] = fp32
    results.meta["evals"] = eval_names
    if "fp32" in cfg.methods:
        results.add([_row("fp32", "-", "-", None, name, fp32[name]["ppl"], fp32[name]["ppl"],
                          fp32[name]["n_windows"], "-", {}, None) for name in eval_names])
    results.save()

    # ---- every other cell
    # Bit-config major order: an interrupted run has whole bit configs (all methods side by side).
    cells = []
    for b in ["-"] + bits:
        for method in cfg.methods:
            if method == "fp32" or (method in BITLESS) != (b == "-"):
                continue
            for o in (list(cfg.objectives) if method in TRAINED else ["-"]):
                cells.append((method, b, o))
    ckpt_dir = out / "checkpoints"
    for i, (method, b, obj) in enumerate(cells):
        if results.has_cell(method, b, obj, eval_names):
            log(f"[{i + 1}/{len(cells)}] {method} {b} {obj}: already in {results.json_path.name}, skipped")
            continue
        w_bits, a_bits = parse_bits(b) if b != "-" else (None, None)
        plan = make_plan(method, w_bits, a_bits)
        t0 = time.perf_counter()
        qm = sasq.quantize(model, plan)
        if plan.mode == "static":
            sasq.calibrate(qm, calib, seqlen=seqlen, progress=cfg.progress)
        train_info = {}
        if method in TRAINED:
            ck = ckpt_dir / (cell_key(method, b, obj).replace("|", "_") + ".npz")
            tr = train_scales(qm, train_ids, steps=cfg.steps, lr=cfg.lr, seqlen=seqlen, batch=cfg.batch,
                              objective=obj, schedule=cfg.schedule, val_ids=val_ids,
                              val_windows=cfg.val_windows, checkpoint=ck, resume=True, seed=cfg.seed,
                              eval_every=max(1, cfg.steps // max(1, cfg.evals_during_training)),
                              progress=cfg.progress)
            train_info = {"train_steps": tr.steps, "initial_val": tr.initial_val, "best_val": tr.best_val,
                          "best_step": tr.best_step, "final_train_loss": tr.final_loss,
                          "seconds_per_step": tr.seconds_per_step}
        prep = time.perf_counter() - t0
        rows = []
        for name in eval_names:
            r = ppl(qm, name)
            rows.append(_row(method, b, obj, plan, name, float(r.ppl), fp32[name]["ppl"], int(r.n_windows),
                             trained_on if method in TRAINED else
                             (f"calib: {trained_on}" if plan.mode == "static" else "-"),
                             train_info, prep))
        results.add(rows)
        summary = ", ".join(f"{r['eval']}: {_fmt_ppl(r['ppl'])}" for r in rows)
        log(f"[{i + 1}/{len(cells)}] {METHOD_LABELS[method]} {b} {obj}: {summary} "
            f"({time.perf_counter() - t0:.0f} s)")
    return {"version": RESULTS_VERSION, "meta": results.meta, "rows": results.rows,
            "dir": str(out)}


def _row(method, bits, objective, plan, eval_name, ppl, fp32_ppl, n_windows, trained_on, train_info, prep_s):
    d = describe(method, plan)
    return {"method": method, "label": METHOD_LABELS[method], "bits": bits, "objective": objective,
            **d, "trained_on": trained_on, "eval": eval_name, "ppl": ppl,
            "delta": (ppl / fp32_ppl - 1.0) if method != "fp32" else None,
            "n_windows": n_windows, "prep_seconds": prep_s, **train_info}
