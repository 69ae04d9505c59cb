"""A run folder read back (sasq.runs): a trained cell rebuilt from its checkpoint computes what the
run measured, GPTQ weights included (a checkpoint holds scales only)."""
import shutil

import numpy as np
import pytest

import sasq
from sasq.eval import Reference
from sasq.runs import load_run, quant_from_checkpoint, run_model


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory, stories_dir, assets):
    """stories260K, W4A8, one trained SASQ + rotation + GPTQ cell (a few seconds)."""
    from conftest import tiny_run
    return tiny_run(tmp_path_factory.mktemp("run"), stories_dir, assets,
                    methods=("fp32", "sasq_rot_gptq"), steps=2)


def test_checkpoint_of_a_gptq_cell_computes_the_recorded_perplexity(gptq_run, tmp_path):
    doc = load_run(gptq_run)
    row = next(r for r in doc["rows"] if r["method"] == "sasq_rot_gptq" and r["eval"] == "eval.txt")
    model = run_model(doc)
    ck = gptq_run / "checkpoints" / "sasq_rot_gptq_W4A8_kl.npz"
    qm, cell, _ = quant_from_checkpoint(model, ck)  # finds the run's calibration windows
    assert cell == ("sasq_rot_gptq", "W4A8", "kl") and qm.gptq is not None
    with np.load(gptq_run / "reference_0.npz") as z:  # the run's eval windows and FP32 hidden
        ref = Reference(z["windows"], z["hidden"], model.lm_head)
    r = sasq.perplexity(qm, ref.windows, ref.windows.shape[1], progress=False, reference=ref)
    assert abs(r.ppl / row["ppl"] - 1) < 1e-5 and abs(r.kl - row["kl"]) < 1e-5 * max(row["kl"], 1)
    # round-to-nearest weights (what a checkpoint alone gives) compute something else
    rtn = sasq.quantize(qm.model, qm.plan)
    rtn.load_state_dict(qm.state_dict())
    assert abs(sasq.perplexity(rtn, ref.windows, ref.windows.shape[1], progress=False).ppl
               / row["ppl"] - 1) > 1e-3
    lone = tmp_path / ck.name  # outside its run folder: no calibration windows to redo GPTQ
    shutil.copy(ck, lone)
    with pytest.raises(ValueError, match="GPTQ weights.*calibration windows"):
        quant_from_checkpoint(model, lone)
    qm2, _, _ = quant_from_checkpoint(model, lone, calib=np.asarray(
        sasq.runs.run_data(doc, model, gptq_run).calib))
    assert all(np.array_equal(qm.gptq[k][0], qm2.gptq[k][0]) for k in qm.gptq)


def _rewrite_state(src, dst, edit):
    """Copy a checkpoint npz with its JSON state edited."""
    import json
    with np.load(src) as z:
        items = {n: z[n] for n in z.files}
    state = edit(json.loads(bytes(items.pop("__state__")).decode()))
    np.savez(dst, __state__=np.frombuffer(json.dumps(state).encode(), np.uint8), **items)


def test_checkpoint_of_another_plan_is_refused(gptq_run, tmp_path):
    """The catalogue's plan for a cell may change (searched weight scales, R4): a checkpoint
    trained with another plan, or recording none, must not be loaded onto today's plan."""
    doc = load_run(gptq_run)
    model = run_model(doc)
    ck = gptq_run / "checkpoints" / "sasq_rot_gptq_W4A8_kl.npz"
    (tmp_path / "checkpoints").mkdir()
    cases = {
        "w_clip": lambda st: {**st, "config": {**st["config"],
                                               "plan": {**st["config"]["plan"], "w_clip": False}}},
        "rotation_version": lambda st: {**st, "config": {**st["config"], "rotation_version": 1}},
        "records no plan": lambda st: {**st, "config": {k: v for k, v in st["config"].items()
                                                        if k != "plan"}},
    }
    for what, edit in cases.items():
        bad = tmp_path / "checkpoints" / ck.name
        _rewrite_state(ck, bad, edit)
        with pytest.raises(ValueError, match=what) as e:
            quant_from_checkpoint(model, bad, calib=np.zeros((1, 8), np.int64))
        assert str(bad) in str(e.value)


def test_resume_and_merge_refuse_other_data(tmp_path):
    """Same corpus names or paths, other text: a resumed run or a merge must not put old rows and
    FP32 baselines next to new ones."""
    from sasq.results import Results, check_data, data_fingerprint, merge_runs
    rng = np.random.default_rng(0)
    train, val, ev = rng.integers(0, 50, 300), rng.integers(0, 50, 60), rng.integers(0, 50, 80)
    calib = train[:64].reshape(2, 32)
    fp = data_fingerprint(train, val, calib, {"e": ev})
    meta = {"identity": {"x": 1}, "data": fp, "fp32": {"e": {"ppl": 5.0}}}
    Results(tmp_path, meta).save()
    check_data(tmp_path / "results.json", fp)  # the same data: fine
    ev2 = ev.copy()
    ev2[3] += 1
    with pytest.raises(ValueError, match="other data.*eval e"):
        check_data(tmp_path / "results.json", data_fingerprint(train, val, calib, {"e": ev2}))
    with pytest.raises(ValueError, match="other data.*calib"):
        check_data(tmp_path / "results.json", data_fingerprint(train, val, calib[::-1], {"e": ev}))
    from sasq.model import LlamaConfig, random_model
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with_model = tmp_path / "with_model"
    Results(with_model, {**meta, "data": data_fingerprint(train, val, calib, {"e": ev},
                                                          random_model(cfg, seed=0))}).save()
    with pytest.raises(ValueError, match="other data.*model"):  # same path, other weights
        check_data(with_model / "results.json",
                   data_fingerprint(train, val, calib, {"e": ev}, random_model(cfg, seed=1)))
    # a folder written before fingerprints: its eval protocols' token hashes are compared
    from sasq.external import tokens_sha256
    legacy = tmp_path / "legacy"
    Results(legacy, {"identity": {"x": 1}, "protocols": {"e": {"tokens_sha256": tokens_sha256(ev)}}}).save()
    check_data(legacy / "results.json", fp)
    with pytest.raises(ValueError, match="eval e"):
        check_data(legacy / "results.json", data_fingerprint(train, val, calib, {"e": ev2}))
    doc = {"meta": meta, "rows": []}
    assert merge_runs(doc, {"meta": dict(meta), "rows": []})["rows"] == []
    with pytest.raises(ValueError, match="other data.*eval e"):
        merge_runs(doc, {"meta": {**meta, "data": data_fingerprint(train, val, calib, {"e": ev2})},
                         "rows": []})
    with pytest.raises(ValueError, match="FP32 on e"):
        merge_runs(doc, {"meta": {**meta, "fp32": {"e": {"ppl": 5.5}}}, "rows": []})


def test_run_refuses_to_resume_on_changed_eval_text(tmp_path, stories_dir, assets):
    from sasq.experiment import ExperimentConfig, run_experiment
    wt = assets / "wikitext-2"
    (tmp_path / "train.txt").write_text((wt / "tokens-v1" / "valid.txt").read_text()[:12_000])
    text = (wt / "raw-v1" / "test.joined.txt").read_text()[:3_000]
    (tmp_path / "eval.txt").write_text(text)
    cfg = ExperimentConfig(model=str(stories_dir), train=str(tmp_path / "train.txt"),
                           eval=str(tmp_path / "eval.txt"), bits=("W8A8",),
                           methods=("fp32", "dynamic_token"), steps=1, seqlen=32, batch=1,
                           calib_windows=2, val_windows=2, eval_windows=3, own_windows=1,
                           out=str(tmp_path / "res"), progress=False)
    run_experiment(cfg, log=lambda *a: None)
    run_experiment(cfg, log=lambda *a: None)  # resumes: nothing changed
    (tmp_path / "eval.txt").write_text(text[::-1])
    with pytest.raises(ValueError, match="other data.*eval eval.txt"):
        run_experiment(cfg, log=lambda *a: None)


def test_checkpoint_onto_another_model_is_refused(gptq_run):
    doc = load_run(gptq_run)
    model = run_model(doc)
    other = model.copy_with(lm_head=model.lm_head * 1.01)
    with pytest.raises(ValueError, match="another model"):
        quant_from_checkpoint(other, gptq_run / "checkpoints" / "sasq_rot_gptq_W4A8_kl.npz")
