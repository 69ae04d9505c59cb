"""The results table: JSON round trip, Markdown rendering, resume skips finished cells, CLI config."""
import argparse
import json

import numpy as np
import pytest

from sasq.experiment import OWN_DOMAIN, ExperimentConfig, run_experiment
from sasq.methods import METHOD_LABELS, parse_bits
from sasq.results import Results, load_results, render_markdown


def _meta(**identity):
    return {"model_name": "m", "trained_on": "valid.txt", "seqlen": 8, "bits": ["W8A8"],
            "evals": ["test.txt", OWN_DOMAIN], "identity": {"steps": 3, **identity},
            "fp32": {"test.txt": {"ppl": 10.0, "n_windows": 5}, OWN_DOMAIN: {"ppl": 4.0, "n_windows": 2}}}


def _row(method, bits, obj, ev, ppl):
    return {"method": method, "label": METHOD_LABELS[method], "bits": bits, "objective": obj, "granularity": "channel",
            "form": "folded", "mode": "static", "trained_on": "valid.txt", "eval": ev, "ppl": ppl,
            "delta": ppl / (10.0 if ev == "test.txt" else 4.0) - 1, "n_windows": 5,
            "kl": 0.05 if ev == "test.txt" else 0.125, "top1": 0.9}


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8)
    assert parse_bits(" w6a6 ") == (6, 6)
    assert parse_bits("W4A16") == (4, None) and parse_bits("W16A8") == (None, 8)
    for bad in ("W8", "A8W8", "W1A8", "W9A9", "W8A8x", "W16A16", "W4A12"):
        with pytest.raises(ValueError, match="bit"):
            parse_bits(bad)


def test_results_round_trip_resume_and_markdown(tmp_path):
    r = Results(tmp_path, _meta())
    rows = [_row("sasq", "W8A8", "ce", "test.txt", 12.5), _row("sasq", "W8A8", "ce", OWN_DOMAIN, 4.4)]
    r.add(rows)
    r.add(rows[:1])  # a duplicate is not stored twice
    doc = load_results(tmp_path / "results.json")
    assert doc["rows"] == rows and doc["meta"]["fp32"]["test.txt"]["ppl"] == 10.0
    again = Results(tmp_path, _meta())  # a rerun sees the finished cell
    assert again.has_cell("sasq", "W8A8", "ce", ["test.txt", OWN_DOMAIN])
    assert not again.has_cell("sasq", "W8A8", "kl", ["test.txt", OWN_DOMAIN])
    with pytest.raises(ValueError, match="different settings.*lr"):
        Results(tmp_path, _meta(lr=0.1))
    md = (tmp_path / "results.md").read_text()
    assert md == render_markdown(doc)
    line = next(l for l in md.splitlines() if l.startswith("| SASQ hard clamp +sink | W8A8"))
    for want in ("12.50 | +25.0% | 0.0500 | 90.0%", "4.40 | +10.0% | 0.1250 | 90.0%"):
        assert want in line, line
    assert "FP32 PPL 10.00, 5 windows x 8 tokens" in md
    compact = md[md.index("## test.txt"):]  # the pivot per eval set: PPL / KL / top-1
    # the FP32 row is always there (from meta when the run had no fp32 cell), in its own column
    assert "| SASQ hard clamp +sink | ce | valid.txt |  | 12.50 / 0.0500 / 90.0% |" in compact
    assert "| FP32 | - | - | 10.00 / 0.0000 / 100.0% |  |" in compact
    assert md.count("| FP32 |") == 3  # the full table and both pivots


def test_corrupt_results_file_is_a_clear_error(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable results file"):
        Results(tmp_path, _meta())


def test_end_to_end_tiny_run_and_resume(tmp_path, stories_dir, assets, monkeypatch):
    pytest.importorskip("sasq.quant")
    wt = assets / "wikitext-2"
    train = tmp_path / "train.txt"
    train.write_text((wt / "tokens-v1" / "valid.txt").read_text()[:12_000])
    ev = tmp_path / "eval.txt"
    ev.write_text((wt / "raw-v1" / "test.joined.txt").read_text()[:3_000])
    cfg = ExperimentConfig(model=str(stories_dir), train=str(train), eval=str(ev), bits=("W8A8",),
                           methods=("fp32", "static_tensor", "dynamic_token", "sasq"), objectives=("kl",),
                           steps=2, seqlen=32, batch=1, calib_windows=2, val_windows=2, eval_windows=3,
                           own_windows=2, out=str(tmp_path / "res"), progress=False)
    doc = run_experiment(cfg, log=lambda *a: None)
    rows = doc["rows"]
    assert {(r["method"], r["eval"]) for r in rows} == {
        (m, e) for m in ("fp32", "static_tensor", "dynamic_token", "sasq") for e in ("eval.txt", OWN_DOMAIN)}
    fp32 = {r["eval"]: r["ppl"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        assert np.isfinite(r["ppl"]) and r["ppl"] > 1
        if r["method"] != "fp32":
            assert r["delta"] == pytest.approx(r["ppl"] / fp32[r["eval"]] - 1)
    sasq_row = next(r for r in rows if r["method"] == "sasq")
    assert sasq_row["train_steps"] == 2 and sasq_row["objective"] == "kl"
    assert doc["meta"]["fp32"]["eval.txt"]["n_windows"] == 3
    saved = json.loads((tmp_path / "res" / "results.json").read_text())
    assert saved["rows"] == rows

    # Rerun: every cell is already there, so nothing is quantized or trained again.
    import sasq

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(sasq, "quantize", boom)
    doc2 = run_experiment(cfg, log=lambda *a: None)
    assert doc2["rows"] == rows
    # A new bit config only adds its own cells.
    monkeypatch.undo()
    cfg3 = ExperimentConfig(**{**cfg.__dict__, "bits": ("W8A8", "W4A8"), "methods": ("dynamic_token",)})
    doc3 = run_experiment(cfg3, log=lambda *a: None)
    assert len(doc3["rows"]) == len(rows) + 2


def test_cli_defaults_are_data_free_and_small():
    from sasq.commands.run import add_arguments, config_from_args
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args([]))
    assert cfg.train is None and cfg.eval is None and cfg.model is None
    assert cfg.bits == ("W8A8", "W6A6", "W4A8", "W4A4") and cfg.objectives == ("ce", "kl")
    q = config_from_args(p.parse_args(["--quick", "--objective", "kl"]))
    assert q.steps < cfg.steps and q.objectives == ("kl",)
    with pytest.raises(ValueError, match="--steps"):
        config_from_args(p.parse_args(["--steps", "0"]))


def test_cells_of_another_recipe_are_refused_legacy_rows_kept(tmp_path):
    """A stored cell computed with another plan (or rotation code) is not taken as done."""
    from sasq.experiment import _recipe
    from sasq.plan import QuantPlan
    from sasq.results import Results
    r = Results(tmp_path, {"identity": {"x": 1}})
    row = {"method": "quarot_rtn", "bits": "W4A8", "objective": "-", "eval": "e", "ppl": 1.0,
           "kl": 0.0, "top1": 1.0, "recipe": _recipe(QuantPlan(4, 8, mode="dynamic", rotate=True))}
    r.rows.append(row)  # (add() would also render: these rows are bare)
    same = _recipe(QuantPlan(4, 8, mode="dynamic", rotate=True))
    assert r.has_cell("quarot_rtn", "W4A8", "-", ["e"], recipe=same)
    other = _recipe(QuantPlan(4, 8, mode="dynamic", rotate=True, w_clip=True))
    with pytest.raises(ValueError, match="another recipe.*w_clip"):
        r.has_cell("quarot_rtn", "W4A8", "-", ["e"], recipe=other)
    bumped = dict(same, rotation_version=same["rotation_version"] - 1)
    with pytest.raises(ValueError, match="rotation_version"):
        r.has_cell("quarot_rtn", "W4A8", "-", ["e"], recipe=bumped)
    # the catalogue's calibration/training of a method is part of it; rows recorded before
    # those fields existed are compared on what they hold
    keyed = dict(row, method="static_tensor", bits="W8A8",
                 recipe=dict(_recipe(QuantPlan(8, 8), "static_tensor"), calibrate="mse"))
    r.rows.append(keyed)
    with pytest.raises(ValueError, match="another recipe.*calibrate"):
        r.has_cell("static_tensor", "W8A8", "-", ["e"], recipe=_recipe(QuantPlan(8, 8), "static_tensor"))
    keyed["recipe"] = _recipe(QuantPlan(8, 8))  # no calibrate/train fields: taken
    assert r.has_cell("static_tensor", "W8A8", "-", ["e"], recipe=_recipe(QuantPlan(8, 8), "static_tensor"))
    legacy = dict(row, method="gptq")
    legacy.pop("recipe")
    r.rows.append(legacy)  # recorded before recipes: taken as it is
    assert r.has_cell("gptq", "W4A8", "-", ["e"], recipe=other)


def test_catalogue_plans_at_float_weights():
    """W16Ax: no weights to round, so no searched scales; every applicable row builds."""
    from sasq.methods import METHODS, applies, make_plan
    for key in METHODS:
        if key in ("gptq", "quarot_gptq", "sasq_rot_gptq"):
            continue  # GPTQ rounds weights: needs them quantized
        if applies(key, None, 8):
            p = make_plan(key, None, 8)
            assert p is None or not p.w_clip


def test_static_check_compares_sasq_with_the_best_static_ptq_cell(tmp_path):
    """The fidelity bar in results.md: SASQ KL against the best static PTQ cell of its bits and
    eval set; dynamic rows (GPTQ/QuaRot calibrate too) are not static PTQ."""
    from sasq.methods import STATIC_PTQ
    from sasq.results import render_static_check
    assert "gptq" not in STATIC_PTQ and "quarot_gptq" not in STATIC_PTQ
    assert {"static_tensor", "smoothquant_sink", "static_channel"} <= set(STATIC_PTQ)

    def row(method, bits, kl, ev="test.txt"):
        return dict(_row(method, bits, "kl" if method.startswith("sasq") else "-", ev, 11.0), kl=kl)
    rows = [row("static_tensor", "W8A8", 0.02), row("smoothquant_sink", "W8A8", 0.01),
            row("gptq", "W8A8", 0.001),  # dynamic: not the bar
            row("sasq", "W8A8", 0.008), row("sasq_trunc", "W8A8", 0.0125),
            row("sasq", "W4A8", 0.5),  # no static cell at W4A8: no line
            row("sasq", "W8A8", 0.3, ev=OWN_DOMAIN)]  # no static cell on this eval set
    doc = {"meta": _meta(), "rows": rows}
    out = render_static_check(doc)
    assert "1 of 2 SASQ cells at or below it." in out
    assert "| test.txt | W8A8 | SASQ hard clamp +sink | kl | 0.0080 | SmoothQuant static +sink | " \
           "0.0100 | -20.0% |" in out
    assert "| SASQ + truncation +sink | kl | 0.0125 | SmoothQuant static +sink | 0.0100 | " \
           "+25.0% (above) |" in out
    assert "W4A8" not in out and OWN_DOMAIN not in out
    assert out in render_markdown(doc)
    assert render_static_check({"meta": _meta(), "rows": rows[:3]}) == ""
