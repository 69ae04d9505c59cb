"""A finished (or interrupted) `sasq run` folder read back into objects: its results, its model,
the calibration windows it used, and a trained cell as a QuantModel next to its PTQ start.

Checkpoints are named after their cell: checkpoints/<method>_<bits>_<objective>.npz (method keys
contain underscores, bits and objective never do).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sasq.optim import _MIN_LINEAR


def results_path(run) -> Path:
    p = Path(run)
    return p / "results.json" if p.is_dir() else p


def load_run(run) -> dict:
    """Our results document of a run folder (or its results.json)."""
    from sasq.results import load_results
    p = results_path(run)
    if not p.is_file():
        raise FileNotFoundError(f"no results.json in {run} (is it a `sasq run --out` folder?)")
    return load_results(p)


def run_model(doc: dict):
    """The model the run was made with (the path recorded in its results)."""
    import sasq
    return sasq.load(doc["meta"]["model"])


def run_config(doc: dict, run_dir):
    """The ExperimentConfig of a run, from the identity recorded in its results."""
    from sasq.experiment import ExperimentConfig
    ident = dict(doc["meta"]["identity"])
    known = set(ExperimentConfig.__dataclass_fields__)
    return ExperimentConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                               for k, v in ident.items() if k in known},
                            out=str(run_dir), progress=False)


def run_data(doc: dict, model, run_dir):
    """The run's data (sasq.experiment.Data: calibration windows, training stream, eval sets),
    rebuilt exactly as the run built it (data-free samples are read from the run folder)."""
    from sasq.experiment import prepare_data
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    return prepare_data(run_config(doc, run_dir), model, run_dir, log=lambda *a: None)


def parse_cell(name: str) -> tuple[str, str, str]:
    """(method, bits, objective) of a checkpoint file name such as sasq_trunc_W4A8_kl.npz."""
    stem = Path(name).name
    stem = stem[:-4] if stem.endswith(".npz") else stem
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"{name}: not a cell checkpoint name (<method>_<bits>_<objective>.npz)")
    return parts[0], parts[1], parts[2]


def checkpoints(run_dir) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    return sorted(d.glob("*.npz")) if d.is_dir() else []


def base_model(model, plan):
    """The model a plan quantizes: rotated first when the plan says so."""
    if plan is not None and getattr(plan, "rotate", False):
        from sasq.rotate import rotate_model
        return rotate_model(model, seed=plan.rotate_seed, online_qk=plan.rotate_qk)
    return model


def _run_dir(ckpt) -> Path | None:
    """The run folder a checkpoint sits in (RUN/checkpoints/X.npz), or None."""
    run_dir = Path(ckpt).resolve().parent.parent
    return run_dir if (run_dir / "results.json").is_file() else None


def _run_calib(ckpt, model):
    """The calibration windows of the checkpoint's run folder, or None when it is in none."""
    run_dir = _run_dir(ckpt)
    return None if run_dir is None else run_data(load_run(run_dir), model, run_dir).calib


def _check_model(ckpt, model) -> None:
    """A checkpoint in a run folder that recorded its model's fingerprint must be loaded onto
    that model (scales of one model mean nothing on another)."""
    from sasq.eval import model_fingerprint
    run_dir = _run_dir(ckpt)
    if run_dir is None:
        return
    want = (load_run(run_dir)["meta"].get("data") or {}).get("model")
    if want is not None and model_fingerprint(model).tobytes().hex() != want:
        raise ValueError(f"{ckpt}: its run ({run_dir}) was made with another model than the one "
                         f"given ({load_run(run_dir)['meta'].get('model')})")


def quant_from_checkpoint(model, ckpt, calib=None):
    """(QuantModel with the checkpoint's trained parameters, (method, bits, objective), training
    state). The best held-out parameters when the checkpoint has them (what training returns),
    else the last ones. A checkpoint holds scales only: a GPTQ plan's weights are recomputed
    from the run's calibration windows (`calib`, else those of the run folder the checkpoint
    sits in); without them it is refused, never run on round-to-nearest weights."""
    import sasq
    from sasq.methods import method, parse_bits
    from sasq.optim import load_checkpoint

    key, bits, obj = parse_cell(ckpt)
    w_bits, a_bits = parse_bits(bits) if bits != "-" else (None, None)
    plan = method(key).plan(w_bits, a_bits)
    state, arrays = load_checkpoint(ckpt)
    _check_recipe(ckpt, state, plan)
    _check_model(ckpt, model)
    qm = sasq.quantize(base_model(model, plan), plan)
    if plan.weights == "gptq":
        calib = _run_calib(ckpt, model) if calib is None else calib
        if calib is None:
            raise ValueError(f"{ckpt}: {plan.label} has GPTQ weights, computed from the run's "
                             f"calibration windows; keep the checkpoint in its run folder "
                             f"(RUN/checkpoints/) or pass calib=")
        sasq.calibrate(qm, calib, progress=False)  # the run's GPTQ weights; scales replaced below
    params = {k: np.array(v) for k, v in (arrays["best"] or arrays["var"]).items()}
    if (state.get("config") or {}).get("space") == "linear":  # Adam ran on exp(log-scale)
        for k in qm.log_param_keys() & set(params):  # as training put them (ParamSpace.put)
            params[k] = np.log(np.maximum(params[k].astype(np.float64), _MIN_LINEAR)
                               ).astype(params[k].dtype)
    unknown, missing = set(params) - set(qm.params), set(qm.params) - set(params)
    if unknown or missing:
        raise ValueError(f"{ckpt}: its parameters do not match {plan.label} (unknown "
                         f"{sorted(unknown)[:3]}, missing {sorted(missing)[:3]})")
    st = qm.state_dict()
    st.update(params)
    qm.load_state_dict(st)
    return qm, (key, bits, obj), state


def _check_recipe(ckpt, state: dict, plan) -> None:
    """A checkpoint holds scales for the plan it was trained with (recorded by train_scales);
    refuse it when the catalogue's plan for its cell, or the rotation code, is another now."""
    import json

    from sasq.rotate import ROTATION_VERSION
    cfg = state.get("config") or {}
    if cfg.get("plan") is None:
        raise ValueError(f"{ckpt}: records no plan (written by an older sasq); its scales cannot "
                         f"be matched to today's {plan.label}: train the cell again")
    want = json.loads(json.dumps(plan.to_dict()))
    diff = sorted(k for k in set(want) | set(cfg["plan"]) if want.get(k) != cfg["plan"].get(k))
    rot = ROTATION_VERSION if plan.rotate else None
    if cfg.get("rotation_version") != rot:
        diff.append("rotation_version")
    if diff:
        raise ValueError(f"{ckpt}: trained with another plan than the catalogue's for this cell "
                         f"now ({', '.join(diff)}): train the cell again")


def start_state(qm, calib, name: str | None) -> dict:
    """The state dict of the PTQ start named `name` (as sasq.start.choose_start recorded it in
    the row's "start"), or of absmax-mean calibration when name is None. Leaves qm unchanged."""
    from sasq.calibration import calibrate
    from sasq.sites import RHO_MAX
    from sasq.start import candidate_starts

    keep = qm.state_dict()
    try:
        if name is None:
            calibrate(qm, calib, progress=False)
            return qm.state_dict()
        suffix = " +clamp-like knee"
        base = name[: -len(suffix)] if name.endswith(suffix) else name
        for cand, st in candidate_starts(qm, calib):
            if cand == base:
                st = dict(st)
                if name.endswith(suffix):
                    st.update({k: np.full_like(v, RHO_MAX) for k, v in st.items() if k.endswith(".rho")})
                return st
        raise ValueError(f"no PTQ start named {name!r} for {qm.plan.label}")
    finally:
        qm.load_state_dict(keep)
