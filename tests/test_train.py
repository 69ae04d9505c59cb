"""Scale-only training: losses, Adam loop, checkpoints/resume, and a real stories260K run.

The mechanics (resume, atomic checkpoints, seeds, early stopping) are tested on a tiny
NumPy stand-in with the QuantModel interface (a per-channel log-gain before a tanh and a
linear head), so they run in milliseconds and do not depend on other modules; the SASQ
behaviour itself is tested on the real stories260K model with sasq.quant.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from sasq import losses
from sasq.data import cut_windows as fixed_windows
from sasq.data import sample_batch
from sasq.optim import load_checkpoint
from sasq.train import lr_at, train_scales

GRAD_RTOL = 1e-6  # float64 central differences vs analytic loss gradients
FD_EPS = 1e-6


# --------------------------------------------------------------------------- a tiny stand-in

class _Teacher:
    def __init__(self, emb, head, gain):
        self.embed, self.lm_head, self.gain = emb, head, gain
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, ids, return_hidden=False, cache=None):
        h = np.tanh(self.embed[ids] * self.gain)  # (B, T, C)
        return h if return_hidden else h @ self.lm_head.T


@dataclass
class _Tape:
    x: np.ndarray
    h: np.ndarray
    logits: np.ndarray | None

    @property
    def hidden(self):
        return self.h


class TinyQModel:
    """QuantModel-shaped: params {'log_gain': (C,)}, grads, forward_tape/backward, sync."""

    def __init__(self, vocab=13, width=6, seed=0, init_log_gain=None):
        r = np.random.default_rng(seed)
        self.embed = r.normal(size=(vocab, width)).astype(np.float32)
        self.lm_head = r.normal(size=(vocab, width)).astype(np.float32)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.model = _Teacher(self.embed, self.lm_head, np.ones(width, np.float32))
        lg = np.zeros(width, np.float32) if init_log_gain is None else np.asarray(init_log_gain, np.float32)
        self.params = {"log_gain": lg.copy()}
        self.grads = {"log_gain": np.zeros(width, np.float32)}
        self.sync()

    def sync(self):
        self.gain = np.exp(self.params["log_gain"])

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def forward(self, ids, return_hidden=False, cache=None):
        h = np.tanh(self.embed[ids] * self.gain)  # (B, T, C)
        return h if return_hidden else h @ self.lm_head.T

    def forward_tape(self, ids, recompute=False, compute_logits=True):
        x = self.embed[ids]
        h = np.tanh(x * self.gain)
        return _Tape(x, h, h @ self.lm_head.T if compute_logits else None)

    def backward(self, tape, dlogits=None, *, dhidden=None):
        dh = dlogits @ self.lm_head if dhidden is None else dhidden  # (B, T, C)
        dpre = dh * (1 - tape.h ** 2)
        dgain = (dpre * tape.x).sum(axis=(0, 1))
        self.grads["log_gain"] += (dgain * self.gain).astype(np.float32)
        return None


def _stream(n=4000, vocab=13, seed=1):
    # A Markov-ish stream so the task is learnable: next token depends on the current one.
    r = np.random.default_rng(seed)
    ids = np.empty(n, np.int64)
    ids[0] = 0
    for i in range(1, n):
        ids[i] = (ids[i - 1] * 5 + r.integers(0, 3)) % vocab
    return ids


KW = dict(lr=0.05, seqlen=8, batch=4, progress=False)


# --------------------------------------------------------------------------- losses

def _fd_check(loss_fn, grad, z):
    z = z.copy()
    idx = [(0, 0, 0), (1, 2, 3), (0, 3, 6)]
    for i in idx:
        zp, zm = z.copy(), z.copy()
        zp[i] += FD_EPS
        zm[i] -= FD_EPS
        fd = (loss_fn(zp) - loss_fn(zm)) / (2 * FD_EPS)
        assert abs(fd - grad[i]) <= GRAD_RTOL * max(1.0, abs(fd)) + 1e-9, (i, fd, grad[i])


def test_ce_loss_and_grad_match_finite_differences_and_chunking():
    r = np.random.default_rng(0)
    z = r.normal(size=(2, 5, 7))
    y = r.integers(0, 7, size=(2, 5))
    loss, g = losses.ce_loss_and_grad(z, y, chunk_rows=3)
    loss_full, g_full = losses.ce_loss_and_grad(z, y, chunk_rows=1000)
    assert loss == pytest.approx(loss_full, rel=1e-12)
    np.testing.assert_allclose(g, g_full, rtol=1e-12)
    assert losses.ce_forward(z, y, chunk_rows=4) == pytest.approx(loss, rel=1e-12)
    _fd_check(lambda zz: losses.ce_forward(zz, y), g, z)


def test_ce_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    z = r.normal(size=(3, 4, 9)).astype(np.float32)
    y = r.integers(0, 9, size=(3, 4))
    zt = torch.tensor(z, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt.reshape(-1, 9), torch.tensor(y).reshape(-1))
    lt.backward()
    loss, g = losses.ce_loss_and_grad(z, y, chunk_rows=5)
    assert loss == pytest.approx(lt.item(), rel=1e-5)
    np.testing.assert_allclose(g, zt.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_kl_to_teacher_from_hidden_chunks_matches_dense_and_fd():
    r = np.random.default_rng(2)
    zs = r.normal(size=(2, 4, 7))
    hid = r.normal(size=(2, 4, 3))
    head = r.normal(size=(7, 3))
    zt = hid @ head.T
    loss, g = losses.kl_loss_and_grad(zs, (hid, head), chunk_rows=3)
    loss_dense, _ = losses.kl_loss_and_grad(zs, zt, chunk_rows=100)
    assert loss == pytest.approx(loss_dense, rel=1e-12)
    assert losses.kl_forward(zt, zt) == pytest.approx(0.0, abs=1e-12)
    assert loss > 0
    _fd_check(lambda zz: losses.kl_forward(zz, zt), g, zs)


@pytest.mark.parametrize("chunk", [3, 2048])
def test_loss_gradients_through_the_head_equal_dlogits_at_head(chunk):
    """Student given as (hidden, head): the gradient is d hidden = dlogits @ head, formed chunk by
    chunk without the (N, V) array; the loss is the same."""
    rng = np.random.default_rng(4)
    h, th = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))
    head = rng.standard_normal((11, 6))
    y = rng.integers(0, 11, (2, 5))
    z = h @ head.T
    teacher_logits = th @ head.T
    keep = teacher_logits.copy()
    for fn, other in ((losses.ce_loss_and_grad, y), (losses.kl_loss_and_grad, (th, head)),
                      (losses.kl_loss_and_grad, teacher_logits)):
        l1, g1 = fn(z, other, chunk)
        l2, g2 = fn((h, head), other, chunk)
        assert l2 == pytest.approx(l1, rel=1e-12) and g2.shape == h.shape
        np.testing.assert_allclose(g2, g1 @ head, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(teacher_logits, keep)  # a teacher array is never written


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="targets shape"):
        losses.ce_loss_and_grad(np.zeros((2, 3, 4)), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="out of range"):
        losses.ce_forward(np.zeros((2, 4)), np.array([0, 4]))
    with pytest.raises(ValueError, match="student rows"):
        losses.kl_forward(np.zeros((2, 4)), np.zeros((3, 4)))


# --------------------------------------------------------------------------- loop mechanics

def test_schedule_warmup_cosine_constant():
    assert lr_at(0, 100, 1.0, "cosine", 10, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, "cosine", 10, 0.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, "cosine", 10, 0.0) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, "constant", 10, 0.0) == 1.0


def test_sample_batch_reproducible_and_in_bounds():
    ids = np.arange(100)
    a = sample_batch(np.random.default_rng(3), ids, 5, 9)
    b = sample_batch(np.random.default_rng(3), ids, 5, 9)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 9) and np.all(np.diff(a, axis=1) == 1)
    rows = np.arange(60).reshape(3, 20)
    c = sample_batch(np.random.default_rng(0), rows, 4, 20)
    assert all(any(np.array_equal(r, w) for r in rows) for w in c)
    with pytest.raises(ValueError, match="fewer than"):
        sample_batch(np.random.default_rng(0), ids[:5], 1, 9)
    assert fixed_windows(ids, 10, 3).shape == (3, 10)


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_training_lowers_loss_and_is_reproducible(objective):
    ids = _stream()
    q1 = TinyQModel(init_log_gain=np.full(6, 2.5))  # saturated tanh: a bad start
    if objective == "kl":
        q1.model.gain = np.full(6, 0.5, np.float32)  # teacher differs from the student
    r1 = train_scales(q1, ids[:3000], steps=60, objective=objective, val_ids=ids[3000:], **KW)
    assert r1.best_val < r1.initial_val
    q2 = TinyQModel(init_log_gain=np.full(6, 2.5))
    q2.model.gain = q1.model.gain
    train_scales(q2, ids[:3000], steps=60, objective=objective, val_ids=ids[3000:], **KW)
    np.testing.assert_array_equal(q1.params["log_gain"], q2.params["log_gain"])
    q3 = TinyQModel(init_log_gain=np.full(6, 2.5))
    q3.model.gain = q1.model.gain
    train_scales(q3, ids[:3000], steps=60, objective=objective, val_ids=ids[3000:], seed=7, **KW)
    assert not np.array_equal(q1.params["log_gain"], q3.params["log_gain"])


@pytest.mark.parametrize("space", ["native", "linear"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, space):
    ids = _stream()
    common = dict(steps=17, objective="ce", val_ids=ids[3000:], eval_every=3, space=space,
                  checkpoint_every=4, **KW)
    ref = TinyQModel(init_log_gain=np.full(6, 1.5))
    r_ref = train_scales(ref, ids[:3000], checkpoint=tmp_path / "ref.npz", **common)

    class Killed(Exception):
        pass

    def kill_at_10(step, info):
        if step == 10:
            raise Killed  # dies after step 10; the last checkpoint is step 8

    ck = tmp_path / "run.npz"
    q = TinyQModel(init_log_gain=np.full(6, 1.5))
    with pytest.raises(Killed):
        train_scales(q, ids[:3000], checkpoint=ck, callback=kill_at_10, **common)
    assert load_checkpoint(ck)[0]["step"] == 8
    q2 = TinyQModel(init_log_gain=np.full(6, 1.5))  # a fresh process: new model object
    r2 = train_scales(q2, ids[:3000], checkpoint=ck, resume=True, **common)
    assert r2.resumed_from == 8 and r2.steps == 17
    np.testing.assert_array_equal(q2.params["log_gain"], ref.params["log_gain"])
    assert r2.history == r_ref.history and r2.val_history == r_ref.val_history
    assert r2.best_step == r_ref.best_step
    # a second resume of a finished run returns at once with the same (best) parameters
    q3 = TinyQModel(init_log_gain=np.full(6, 1.5))
    r3 = train_scales(q3, ids[:3000], checkpoint=ck, resume=True, **common)
    assert r3.seconds_per_step is None
    np.testing.assert_array_equal(q3.params["log_gain"], ref.params["log_gain"])


class LinearGainQModel(TinyQModel):
    """Like sasq.quant with QuantPlan(param_space="linear"): a positive parameter stored as is."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.params = {"x.gain": np.full(6, 0.05, np.float32)}
        self.grads = {"x.gain": np.zeros(6, np.float32)}
        self.sync()

    def sync(self):
        if "x.gain" not in self.params:  # during TinyQModel.__init__
            return super().sync()
        if np.any(self.params["x.gain"] <= 0):
            raise ValueError("x.gain must be > 0")
        self.gain = self.params["x.gain"]

    def backward(self, tape, dlogits=None, *, dhidden=None):
        dh = dlogits @ self.lm_head if dhidden is None else dhidden
        self.grads["x.gain"] += ((dh * (1 - tape.h ** 2)) * tape.x).sum(axis=(0, 1)).astype(np.float32)


def test_linear_space_parameters_stay_positive_and_resume(tmp_path):
    ids = _stream()
    # lr 0.5 on gains of 0.05: plain Adam steps would cross zero at once
    common = dict(steps=8, lr=0.5, seqlen=8, batch=4, progress=False, checkpoint_every=2)
    ref = LinearGainQModel()
    train_scales(ref, ids, **common)
    assert np.all(ref.params["x.gain"] >= 0.05 * 1e-3 * (1 - 1e-6))
    q = LinearGainQModel()
    train_scales(q, ids, checkpoint=tmp_path / "c.npz", stop_at=3, **common)
    q2 = LinearGainQModel()
    q2.params["x.gain"][...] = 1.0  # a different start: floors must come from the checkpoint
    train_scales(q2, ids, checkpoint=tmp_path / "c.npz", resume=True, **common)
    np.testing.assert_array_equal(q2.params["x.gain"], ref.params["x.gain"])


def test_stop_at_then_resume_equals_uninterrupted(tmp_path):
    ids = _stream()
    common = dict(steps=12, checkpoint_every=5, schedule="constant", warmup=2, **KW)
    ref = TinyQModel()
    train_scales(ref, ids, **common)
    q = TinyQModel()
    r1 = train_scales(q, ids, checkpoint=tmp_path / "c.npz", stop_at=7, **common)
    assert r1.steps == 7
    q2 = TinyQModel()
    train_scales(q2, ids, checkpoint=tmp_path / "c.npz", resume=True, **common)
    np.testing.assert_array_equal(q2.params["log_gain"], ref.params["log_gain"])
    with pytest.raises(ValueError, match="different settings.*lr"):
        train_scales(TinyQModel(), ids, checkpoint=tmp_path / "c.npz", resume=True,
                     **{**common, "lr": 0.01})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    ids = _stream()
    ck = tmp_path / "c.npz"
    q = TinyQModel()
    train_scales(q, ids, steps=4, checkpoint=ck, checkpoint_every=2, **KW)
    before = ck.read_bytes()
    state_before = load_checkpoint(ck)[0]

    real_savez = np.savez

    def crashing_savez(f, **arrays):
        real_savez(f, **arrays)
        f.write(b"partial")
        raise KeyboardInterrupt("simulated crash while writing")

    monkeypatch.setattr(np, "savez", crashing_savez)
    with pytest.raises(KeyboardInterrupt):
        train_scales(TinyQModel(), ids, steps=6, checkpoint=ck, checkpoint_every=2, resume=False,
                     **KW)
    monkeypatch.undo()
    assert ck.read_bytes() == before  # the old checkpoint is intact
    assert load_checkpoint(ck)[0]["step"] == state_before["step"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temp file left behind


def test_early_stopping_keeps_best_params():
    ids = _stream()
    q = TinyQModel()
    # an absurd lr makes the held-out loss get worse after the first evaluations
    r = train_scales(q, ids[:3000], steps=40, lr=3.0, seqlen=8, batch=4, schedule="constant",
                     val_ids=ids[3000:], eval_every=2, patience=3, progress=False)
    assert r.stopped_early and r.steps < 40
    vals = {h["step"]: h["val"] for h in r.val_history}
    assert r.best_val == min(vals.values()) and vals[r.best_step] == r.best_val
    # the model holds the best parameters: its held-out loss equals best_val
    w = fixed_windows(ids[3000:], 9, 8)
    h = q.forward(w[:, :-1], return_hidden=True)
    assert losses.ce_forward((h, q.lm_head), w[:, 1:]) == pytest.approx(r.best_val, rel=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the lr=1e30 case overflows on purpose
def test_bad_arguments_raise_clear_errors(tmp_path):
    ids = _stream()
    with pytest.raises(ValueError, match="objective"):
        train_scales(TinyQModel(), ids, steps=2, objective="mse", **KW)
    with pytest.raises(ValueError, match="seqlen .* exceeds"):
        train_scales(TinyQModel(), ids, steps=2, lr=0.1, seqlen=100, batch=1, progress=False)
    with pytest.raises(ValueError, match="resume=True needs"):
        train_scales(TinyQModel(), ids, steps=2, resume=True, **KW)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        train_scales(TinyQModel(), ids, steps=2, checkpoint=bad, resume=True, **KW)
    with pytest.raises(FloatingPointError, match="lr"):
        train_scales(TinyQModel(), ids, steps=5, lr=1e30, seqlen=8, batch=4, progress=False)


# --------------------------------------------------------------------------- the real model

def _real_setup(stories_dir):
    sasq = pytest.importorskip("sasq")
    try:
        from sasq import calibrate as _cal  # noqa: F401
        from sasq.quant import QuantPlan, quantize
        from sasq.data import tokenize_corpus
        model = sasq.load(stories_dir)
    except (ImportError, AttributeError, NotImplementedError) as e:
        pytest.skip(f"sasq.model/quant/calibrate/eval not available yet: {e}")
    return sasq, model, QuantPlan, quantize, tokenize_corpus


def test_training_on_stories260k_fixes_a_badly_initialised_plan(stories_dir, assets):
    sasq, model, QuantPlan, quantize, tokenize_corpus = _real_setup(stories_dir)
    text = (assets / "wikitext-2" / "tokens-v1" / "valid.txt").read_text()[:60_000]
    ids = tokenize_corpus(model.tokenizer, text)
    train, val = ids[: len(ids) * 3 // 4], ids[len(ids) * 3 // 4:]
    q = quantize(model, QuantPlan(w_bits=8, a_bits=8, granularity="tensor", mode="static"))
    sasq.calibrate(q, train, seqlen=64, n_windows=4, progress=False)
    for p in q.params.values():  # log-scales: scale x10 clips nothing but rounds coarsely
        p += np.float32(np.log(10.0))
    q.sync()
    r = train_scales(q, train, steps=12, lr=0.1, seqlen=64, batch=2, val_ids=val, val_windows=4,
                     eval_every=4, warmup=0, progress=False)
    assert r.best_val < r.initial_val - 0.05, (r.initial_val, r.val_history)


def test_resume_on_stories260k_is_bit_identical(stories_dir, assets, tmp_path):
    sasq, model, QuantPlan, quantize, tokenize_corpus = _real_setup(stories_dir)
    text = (assets / "wikitext-2" / "tokens-v1" / "valid.txt").read_text()[:20_000]
    ids = tokenize_corpus(model.tokenizer, text)

    def fresh():
        q = quantize(model, QuantPlan(w_bits=8, a_bits=8, granularity="channel", mode="static"))
        sasq.calibrate(q, ids, seqlen=32, n_windows=2, progress=False)
        return q

    common = dict(steps=6, lr=0.03, seqlen=32, batch=2, objective="kl", checkpoint_every=2,
                  progress=False)
    ref = fresh()
    train_scales(ref, ids, **common)
    q = fresh()
    train_scales(q, ids, checkpoint=tmp_path / "c.npz", stop_at=3, **common)
    q2 = fresh()
    train_scales(q2, ids, checkpoint=tmp_path / "c.npz", resume=True, **common)
    for k in ref.params:
        np.testing.assert_array_equal(q2.params[k], ref.params[k], err_msg=k)


def test_teacher_pool_runs_the_teacher_once_per_window():
    from sasq.train import TeacherPool
    q = TinyQModel()
    calls = []
    real = q.model.forward

    def counting(ids, return_hidden=False, cache=None):
        calls.append(len(ids))
        return real(ids, return_hidden=return_hidden)

    q.model.forward = counting
    ids = _stream(600)
    pool = TeacherPool(ids, 9, size=5, seed=0, teacher=q.model)
    assert pool.windows.shape == (5, 9)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        idx, w = pool.batch(rng, 3)
        np.testing.assert_array_equal(w, pool.windows[idx])
        th = pool.teacher_hidden(idx)
        np.testing.assert_allclose(th, real(w[:, :-1], return_hidden=True), rtol=1e-6)
        seen |= set(int(i) for i in idx)
    assert sum(calls) == len(seen) <= 5  # each window's teacher state computed once
    r = train_scales(TinyQModel(), ids, steps=6, objective="kl", pool=4, **KW)
    assert r.steps == 6 and np.isfinite(r.final_loss)


def test_checkpoint_of_another_plan_is_not_resumed(tmp_path):
    """Same parameter shapes, another plan (A6 instead of A8): the checkpoint's parameters mean
    something else, so resuming is refused naming the plan."""
    from sasq.calibration import calibrate
    from sasq.model import LlamaConfig, random_model
    from sasq.plan import QuantPlan
    from sasq.quant import quantize
    cfg = LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = random_model(cfg, seed=1)
    ids = np.random.default_rng(2).integers(0, 30, 400)
    kw = dict(steps=2, seqlen=16, batch=2, lr=0.01, progress=False, checkpoint=tmp_path / "p.npz")
    a = calibrate(quantize(m, QuantPlan(8, 8)), ids[:64].reshape(4, 16), progress=False)
    train_scales(a, ids, **kw)
    b = calibrate(quantize(m, QuantPlan(8, 6)), ids[:64].reshape(4, 16), progress=False)
    assert set(a.params) == set(b.params)
    with pytest.raises(ValueError, match="different settings.*plan"):
        train_scales(b, ids, resume=True, **kw)


def test_ce_training_selected_on_heldout_kl():
    """select="kl": CE training keeps the parameters (the start included) with the lowest
    held-out KL to the FP model; best_val is that KL; resuming checks the setting."""
    from sasq.calibration import calibrate
    from sasq.model import LlamaConfig, random_model
    from sasq.plan import QuantPlan
    from sasq.quant import quantize
    from sasq.train import TrainConfig
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = random_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, 40, 3000)
    q = calibrate(quantize(m, QuantPlan(8, 4, granularity="channel")), ids[:400], seqlen=16,
                  progress=False)
    r = train_scales(q, ids[:2400], steps=12, lr=0.05, seqlen=16, batch=2, objective="ce",
                     select="kl", val_ids=ids[2400:], val_windows=4, eval_every=3, progress=False)
    w = fixed_windows(ids[2400:], 17, 4)
    h = q.forward(w[:, :-1], return_hidden=True)
    t = m.forward(w[:, :-1], return_hidden=True)
    kl = losses.kl_forward((h, q.lm_head), (t, m.lm_head))
    assert kl == pytest.approx(r.best_val, rel=1e-5)
    assert r.best_val == min(v["val"] for v in r.val_history)
    ce = losses.ce_forward((h, q.lm_head), w[:, 1:])
    assert abs(ce - r.best_val) > 1e-3  # it is not the CE
    assert TrainConfig(steps=1, objective="ce", select="kl").identity(4, {})["select"] == "kl"
    assert "select" not in TrainConfig(steps=1, objective="kl", select="kl").identity(4, {})
    with pytest.raises(ValueError, match="select"):
        TrainConfig(steps=1, select="mse")
