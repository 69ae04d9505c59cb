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
    from sasq.experiment import ExperimentConfig, run_experiment
    d = tmp_path_factory.mktemp("run")
    wt = assets / "wikitext-2"
    (d / "train.txt").write_text((wt / "tokens-v1" / "valid.txt").read_text()[:12_000])
    (d / "eval.txt").write_text((wt / "raw-v1" / "test.joined.txt").read_text()[:3_000])
    cfg = ExperimentConfig(model=str(stories_dir), train=str(d / "train.txt"), eval=str(d / "eval.txt"),
                           bits=("W4A8",), methods=("fp32", "sasq_rot_gptq"), objectives=("kl",),
                           steps=2, seqlen=32, batch=1, calib_windows=2, val_windows=2,
                           eval_windows=3, own_windows=2, out=str(d / "res"), progress=False)
    run_experiment(cfg, log=lambda *a: None)
    return d / "res"


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
