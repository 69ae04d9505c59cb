"""sasq.start: every static PTQ baseline is a point of the folded per-channel form (the mapped
state computes the same function), and choose_start leaves the model at the candidate with the
lowest held-out KL."""
import numpy as np
import pytest

from sasq import start
from sasq.calibration import calibrate
from sasq.eval import Reference
from sasq.model import LlamaConfig, random_model
from sasq.plan import QuantPlan
from sasq.quant import quantize

EQUIV_ATOL = 1e-12  # float64: the fold differs from the per-tensor graph by rounding only

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0).astype(np.float64)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 12))


@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("twin", ["tensor", "tensor-nosink", "smoothquant", "channel-nosink"])
def test_static_ptq_rows_are_points_of_the_folded_form(model, ids, sink, twin):
    if twin == "channel-nosink" and not sink:
        pytest.skip("same plan")
    plan = QuantPlan(8, 6, granularity="channel", sink_tokens=sink, kv_bits=None)
    tp = {"tensor": QuantPlan(8, 6, sink_tokens=sink), "tensor-nosink": QuantPlan(8, 6),
          "smoothquant": QuantPlan(8, 6, smoothquant_alpha=0.5, sink_tokens=sink),
          "channel-nosink": QuantPlan(8, 6, granularity="channel")}[twin]
    t = calibrate(quantize(model, tp), ids, progress=False)
    q = quantize(model, plan)
    q.load_state_dict(start._equivalent(q, t))
    np.testing.assert_allclose(q.forward(ids), t.forward(ids), atol=EQUIV_ATOL, rtol=0)
    assert np.abs(q.forward(ids) - model.forward(ids)).max() > 1e-3  # it does quantize


@pytest.mark.parametrize("plan", [QuantPlan(4, 4, granularity="channel", sink_tokens=2),
                                  QuantPlan(4, 4, granularity="channel", truncation=True),
                                  QuantPlan(4, 4, sink_tokens=1)], ids=lambda p: p.label)
def test_choose_start_keeps_the_lowest_heldout_kl(model, ids, plan):
    ref = Reference.compute(model, ids[:2], 12, progress=False)
    q = quantize(model, plan)
    res = start.choose_start(q, ids[2:], ref)
    kls = res["kl"]
    assert len(kls) >= 4 and res["chosen"] == min(kls, key=kls.get)
    assert start.heldout_kl(q, ref) == pytest.approx(min(kls.values()), rel=1e-9, abs=1e-12)
    if plan.folded:  # the per-tensor and SmoothQuant twins are among the candidates
        assert any(k.startswith("tensor/") for k in kls) and any("smoothquant" in k for k in kls)
    if plan.truncation:
        assert any("clamp-like" in k for k in kls)


def test_gptq_act_order_plan_gets_its_starts(model, ids):
    """The sink-less twin of a GPTQ act-order plan rounds RTN: act_order must not reach it."""
    ref = Reference.compute(model, ids[:2], 12, progress=False)
    q = quantize(model, QuantPlan(4, 8, sink_tokens=2, weights="gptq", act_order=True))
    res = start.choose_start(q, ids[2:], ref)
    assert any("sink rows as body" in k for k in res["kl"])


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_static_kv_cache_with_sinks_gets_only_exact_starts(model, ids, granularity):
    """A static KV cache's per-tensor sink scales cannot take a twin's exactly (v arrives divided
    by the o_in fold; a per-channel body has no per-tensor value): such plans start from their
    own calibrations only, every one finite."""
    ref = Reference.compute(model, ids[:2], 12, progress=False)
    q = quantize(model, QuantPlan(8, 8, granularity=granularity, sink_tokens=2, kv_bits=8))
    res = start.choose_start(q, ids[2:], ref)
    assert set(res["kl"]) == {f"{granularity}/{m}" for m in start.CHANNEL_METHODS}
    assert all(np.isfinite(v) for v in res["kl"].values())
    assert start.heldout_kl(q, ref) == pytest.approx(min(res["kl"].values()), rel=1e-9, abs=1e-12)
