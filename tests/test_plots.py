"""sasq.plots: every figure is a non-empty PNG, from synthetic inputs and from a tiny run via
`python -m sasq plot`; without matplotlib the error names the extra."""
import sys

import numpy as np
import pytest

import sasq
from sasq import plots
from sasq.model import LlamaConfig, random_model
from sasq.plan import QuantPlan

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(p):
    data = p.read_bytes()
    return p.stat().st_size > 5000 and data[:8] == PNG


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("matplotlib")
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = random_model(cfg, seed=1)
    wins = np.random.default_rng(0).integers(0, 64, (4, 24))
    return model, wins


def test_activation_plots(tiny, tmp_path):
    model, wins = tiny
    st = plots.collect_activations(model, wins)
    assert st.channel_absmax[(1, "down_in")].shape == (48,) and st.position_absmax[(0, "attn_in")].shape == (24,)
    rows, pos = st.samples[(0, "o_in")]
    assert rows.shape == (4 * 24, 32) and pos[:3].tolist() == [0, 1, 2]
    assert _is_png(plots.plot_channel_ranges(st, tmp_path / "c.png"))
    assert _is_png(plots.plot_position_profile(st, tmp_path / "p.png"))


def test_truncation_and_scale_plots(tiny, tmp_path):
    model, wins = tiny
    qm = sasq.quantize(model, QuantPlan(8, 4, granularity="channel", truncation=True, sink_tokens=2))
    sasq.calibrate(qm, wins, progress=False)
    start = plots.scale_table(qm)
    key = plots.pick_truncation_site(qm, wins)
    x, site = plots.site_inputs(qm, wins, key)
    assert x.shape == (4 * (24 - 2), site.channels)  # sink rows left out
    assert _is_png(plots.plot_truncation(x, site.t, site.c, tmp_path / "t.png", bits=4))
    assert _is_png(plots.plot_truncation(np.random.default_rng(0).standard_normal((500, 3)) * 3, 1.0, 2.0,
                                         tmp_path / "t2.png"))
    for k in qm.params:  # "training": scales move, knees too
        if k.endswith("log_scale"):
            qm.params[k] += 0.1
    qm.sync()
    learned = plots.scale_table(qm)
    assert any(k.endswith(".sink") for k in learned) and any(k.endswith(".knee") for k in learned)
    assert _is_png(plots.plot_scales(learned, start, tmp_path / "s.png"))
    with pytest.raises(ValueError, match="no common scale keys"):
        plots.plot_scales({"a": np.ones(2)}, {"b": np.ones(2)}, tmp_path / "x.png")


def _doc():
    rows = []
    for m, mode in (("static_tensor", "static"), ("dynamic_token", "dynamic"), ("sasq", "static")):
        for b, ppl in (("W8A8", 10.5), ("W4A8", 12.0), ("W4A4", 30.0)):
            rows.append({"method": m, "label": m, "bits": b, "objective": "kl" if m == "sasq" else "-",
                         "trained_on": "t", "eval": "e", "ppl": ppl, "kl": ppl / 100, "top1": 0.9, "mode": mode,
                         **({"history": [[i, 1 / i] for i in range(1, 30)], "val_history": [[0, 1.0], [29, 0.1]]}
                            if m == "sasq" else {})})
    rows.append({"method": "external:QuaRot", "label": "QuaRot (external)", "bits": "W4A4", "objective": "-",
                 "trained_on": "x", "eval": "e", "ppl": 14.0, "kl": None, "external": True})
    return {"version": 1, "meta": {"bits": ["W8A8", "W4A8", "W4A4"], "evals": ["e"], "seqlen": 8,
                                   "fp32": {"e": {"ppl": 10.0, "n_windows": 3}}}, "rows": rows}


def test_result_plots(tmp_path):
    pytest.importorskip("matplotlib")
    doc = _doc()
    assert _is_png(plots.plot_bits(doc, tmp_path / "b.png"))
    curves = plots.loss_curves(doc)
    assert len(curves) == 3 and curves[0]["objective"] == "kl"  # one per trained cell
    assert _is_png(plots.plot_loss(curves, tmp_path / "l.png"))
    # CE training selected on held-out KL: its held-out curve is KL, drawn on its own axis
    ce = [dict(c, objective="ce", select="kl") for c in curves] + [dict(curves[0], objective="ce")]
    assert _is_png(plots.plot_loss(ce, tmp_path / "l2.png"))
    with pytest.raises(ValueError, match="no evaluation set 'nope'"):
        plots.plot_bits(doc, tmp_path / "b.png", eval_name="nope")
    with pytest.raises(ValueError, match="no training curves"):
        plots.plot_loss([], tmp_path / "l.png")


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'sasq\[plot\]'"):
        plots.plot_bits(_doc(), tmp_path / "b.png")
    from sasq.cli import main
    assert main(["plot", str(tmp_path)]) == 1  # one line, not a traceback


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, stories_dir, assets):
    """A real `sasq run` folder in a few seconds: stories260K, W4A8, one trained SASQ+trunc cell."""
    from conftest import tiny_run as make
    return make(tmp_path_factory.mktemp("run"), stories_dir, assets,
                methods=("fp32", "static_tensor", "sasq_trunc"))


def test_plot_command_on_a_tiny_run(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sasq.cli import main
    assert main(["plot", str(tiny_run), "--out", str(tmp_path), "--windows", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[-1] for p in printed) == sorted(plots.FILES.values())
    for name in plots.FILES.values():
        assert _is_png(tmp_path / name), name
    assert main(["plot", str(tiny_run), "--out", str(tmp_path), "--only", "bits,nope"]) == 1
    assert "unknown plot(s) nope" in capsys.readouterr().err
    assert main(["plot", str(tiny_run), "--only", "scales", "--cell", "sasq:W8A8:kl"]) == 1
    assert "no checkpoint for cell 'sasq:W8A8:kl'" in capsys.readouterr().err
