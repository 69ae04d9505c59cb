"""Gradients of the fake-quant model (sasq.quant) in float64 on a tiny random GQA LlamaModel.

What is compared:
1. Quantizers without rounding (the adapted-FP32 control: clamp or smooth truncation, gains): the
   true loss is (piecewise) smooth, so analytic param and input gradients are checked against
   central finite differences of the true loss.
2. Quantizers with rounding: finite differences of the true loss are meaningless (piecewise
   constant), so we difference the *STE/LSQ surrogate*, a function that agrees with the model at
   the base point p0 and whose exact derivative is the STE/LSQ gradient:
     activation site, |u0| <= qmax:     A = y + s_vec * (rint(u0) - u0)   (u0 = y0/s_vec0 frozen)
                      u0 beyond +-qmax:  A = s_vec * qmin|qmax              (clip mask frozen)
     y = truncate(x, sigmoid(rho) c, c), c = s_vec qmax (smooth, not frozen)
     weights of a per-channel fold (producer rows / r, consumer columns * c, r and c from the
       scales): W(p) = diag(r0 / r) Q(diag(1/r0) W diag(c0)) diag(c / c0)
       (weight rounding passed straight through as a frozen multiplicative residual)
     dynamic per-token: A = x + (fq(x0) - x0) frozen.
   The surrogate is written here independently of sasq.sites (own expansion of tied scales,
   own weight quantizer and fold) and run through the FP model's forward with a test hook.
3. The same STE/LSQ model written in torch (autograd, float64): identical logits, scale/rho
   gradients and embedding-output gradients.
"""
import math

import numpy as np
import pytest

from sasq.model import ActivationHook, LlamaConfig, LlamaModel
from sasq.plan import QuantPlan
from sasq.quant import quantize
from sasq.calibration import calibrate

FD_STEP = 1e-5
FD_RTOL = 1e-5            # central differences in float64, O(h^2) + rounding
FD_ATOL_REL = 1e-7        # absolute slack, relative to the largest gradient checked
SURROGATE_BASE_ATOL = 1e-11
TORCH_RTOL = 1e-9
TORCH_ATOL_REL = 1e-10
N_FD = 14                 # param entries checked per plan (random subset)

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def tiny_model(seed=0, dtype=np.float64):
    """Random HF-named tensors -> LlamaModel.from_config_and_tensors. A few outlier channels in
    the norm gains so that clipping and truncation are exercised."""
    rng = np.random.default_rng(seed)
    c = LlamaConfig.from_dict(CFG)
    C, I, H, KVH = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    hd = C // H
    shapes = {"self_attn.q_proj.weight": (H * hd, C), "self_attn.k_proj.weight": (KVH * hd, C),
              "self_attn.v_proj.weight": (KVH * hd, C), "self_attn.o_proj.weight": (C, H * hd),
              "mlp.gate_proj.weight": (I, C), "mlp.up_proj.weight": (I, C),
              "mlp.down_proj.weight": (C, I)}
    t = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, C)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(C),
         "lm_head.weight": rng.standard_normal((c.vocab_size, C)) / math.sqrt(C)}
    for i in range(c.num_hidden_layers):
        for n, sh in shapes.items():
            t[f"model.layers.{i}.{n}"] = rng.standard_normal(sh) / math.sqrt(sh[1])
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            g = 1 + 0.1 * rng.standard_normal(C)
            g[rng.choice(C, 2, replace=False)] *= 6.0        # outlier channels
            t[f"model.layers.{i}.{n}"] = g
    return LlamaModel.from_config_and_tensors(c, t).astype(dtype)   # loads as float32


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, CFG["vocab_size"], (2, 9))
    R = rng.standard_normal((2, 9, CFG["vocab_size"]))      # loss = sum(R * logits)
    return ids, R


def prepared(model, plan, ids, shrink=True, seed=2):
    """Calibrated QuantModel with scales moved off the calibration point (so that some
    elements clip) and rho moved off its init."""
    q = quantize(model, plan)
    calibrate(q, ids, progress=False)
    rng = np.random.default_rng(seed)
    for k, p in q.params.items():
        if shrink and ("log_scale" in k or "log_clip" in k):
            p += np.log(rng.uniform(0.55, 0.95, p.shape))
        elif k.endswith(".rho"):
            p += rng.uniform(-0.5, 0.5, p.shape)
        elif "log_gain" in k:
            p += rng.uniform(-0.2, 0.2, p.shape)
    q.sync()
    return q


def analytic(q, ids, R):
    q.zero_grad()
    tape = q.forward_tape(ids)
    d_embed = q.backward(tape, R)
    return {k: v.copy() for k, v in q.grads.items()}, d_embed, tape.logits


# --------------------------------------------------------------------------- test-side surrogate

def _qm(bits):
    return 2 ** (bits - 1) - 1


def _expand(p, channels, group, hd):
    p = np.asarray(p)
    if p.ndim == 0:
        return np.full(channels, float(p))
    if group == 1:
        return p
    kvh = p.size // hd
    return np.repeat(p.reshape(kvh, 1, hd), group, axis=1).reshape(-1)


def _trunc(x, t, c):
    a = np.abs(x)
    w = c - t
    return np.where(a <= t, x, np.sign(x) * (t + w * np.tanh(np.maximum(a - t, 0) / w)))


def _wq(w, bits):
    if bits is None:
        return w
    qm = _qm(bits)
    s = np.abs(w).max(axis=1, keepdims=True) / qm
    return np.clip(np.rint(w / s), -qm, qm) * s


def _asym_heads(x, bits, hd, clip):
    """Asymmetric min/max rounding per row and head (written here, loop form)."""
    y = np.empty_like(x)
    n = 2 ** bits - 1
    flat, out = x.reshape(-1, hd), y.reshape(-1, hd)
    for r, v in enumerate(flat):
        lo, hi = clip * min(v.min(), 0.0), clip * max(v.max(), 0.0)
        s = (hi - lo) / n if hi > lo else 1.0
        z = np.rint(-lo / s)
        out[r] = (np.clip(np.rint(v / s) + z, 0, n) - z) * s
    return y


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


class Surrogate(ActivationHook):
    """The STE/LSQ surrogate of q at its current params (see module docstring)."""

    def __init__(self, q, ids):
        self._ids = ids
        self.q, self.plan = q, q.plan
        self.sites = {(st.layer, st.name): st for st in q.site_list()}
        self.hd = q.head_dim
        self.frozen = {}
        self.p0 = {k: v.copy() for k, v in q.params.items()}
        self.base_folds = self.folds(self.p0)
        self.recording = True
        self.loss(self.p0, q.model.embed_tokens)     # records the frozen quantities
        self.recording = False

    def val(self, p, key):
        return np.exp(p[key]) if ".log_" in key else p[key]

    def folds(self, p):
        f = {}
        for st in self.sites.values():
            if st.folded:
                f[st.key] = self.val(p, st.scale_key)
        return f

    def weights(self, p):
        m, wb, H, KVH = self.q.model, self.plan.w_bits, self.q.n_heads, self.q.n_kv
        f, f0 = self.folds(p), self.base_folds

        def fw(w, rk, ck, expand_c=False):
            r = f.get(rk, np.ones(w.shape[0])); r0 = f0.get(rk, np.ones(w.shape[0]))
            c = f.get(ck, np.ones(w.shape[1])); c0 = f0.get(ck, np.ones(w.shape[1]))
            if expand_c and ck in f:
                c, c0 = _expand(c, w.shape[1], H // KVH, self.hd), _expand(c0, w.shape[1], H // KVH, self.hd)
            q0 = _wq(w / r0[:, None] * c0[None, :], wb)
            return q0 * (r0 / r)[:, None] * (c / c0)[None, :]

        layers = []
        for i, lw in enumerate(m.layers):
            a, o, ml, d = (f"layers.{i}.{s}" for s in ("attn_in", "o_in", "mlp_in", "down_in"))
            new = dict(
                q_proj=fw(lw.q_proj, None, a), k_proj=fw(lw.k_proj, None, a),
                v_proj=fw(lw.v_proj, o, a), o_proj=fw(lw.o_proj, None, o, expand_c=True),
                gate_proj=fw(lw.gate_proj, None, ml), up_proj=fw(lw.up_proj, d, ml),
                down_proj=fw(lw.down_proj, None, d),
                input_layernorm=lw.input_layernorm / f.get(a, 1.0),
                post_attention_layernorm=lw.post_attention_layernorm / f.get(ml, 1.0))
            layers.append(type(lw)(**new))
        head = m.lm_head
        if self.plan.quant_head:
            head = fw(m.lm_head, None, "head_in")
        return dict(layers=layers, norm=m.norm / f.get("head_in", 1.0), lm_head=head)

    def loss(self, p, embed, R=None, ids=None):
        self.p = p
        self.f = self.folds(p)
        mm = self.q.model.copy_with(embed_tokens=embed, **self.weights(p))
        out = mm.forward(self._ids if ids is None else ids, hook=self)
        self.logits = out
        return None if R is None else float(np.sum(R * out))

    # hook protocol (sasq.model.ActivationHook); the surrogate is only ever differenced
    def forward(self, layer, site, x, pos, keep):
        y = self._quantize(layer, site, x)
        st = self.sites.get((layer, site))
        if st is not None and st.sink and pos < st.sink:   # sink rows: own per-tensor scales
            y = y.copy()
            for j in range(min(st.sink - pos, x.shape[1])):
                y[:, j] = x[:, j] if st.kind == "control" else self._sink_row(layer, site, x[:, j], pos + j)
        return y, None

    def _sink_row(self, layer, site, x, p):
        """A sink row in the domain it arrives in: per-tensor LSQ surrogate with scale s_sink[p]."""
        st = self.sites[(layer, site)]
        s, qm = self.val(self.p, st.sink_key)[p], _qm(st.bits)
        u, key = x / s, (layer, site, "sink", p)
        if self.recording:
            self.frozen[key] = (np.rint(u) - u, u < -qm, u > qm)
        d0, lo, hi = self.frozen[key]
        return np.where(lo, -qm * s, np.where(hi, qm * s, x + s * d0))

    def _quantize(self, layer, site, x):
        st = self.sites.get((layer, site))
        if st is None:
            return x
        key = (layer, site)
        if st.kind == "dynamic":
            if self.recording:
                qm = _qm(st.bits)
                s = np.abs(x).max(-1, keepdims=True) / qm
                self.frozen[key] = np.clip(np.rint(x / s), -qm, qm) * s - x
            return x + self.frozen[key]
        if st.kind == "dynamic_kv":
            if self.recording:
                self.frozen[key] = _asym_heads(x, st.bits, self.hd, st.clip) - x
            return x + self.frozen[key]
        p, hd = self.p, self.hd
        s = _expand(self.val(p, st.scale_key), st.channels, st.spec.tie, hd)
        sig = _expand(_sigmoid(p[st.rho_key]), st.channels, st.spec.tie, hd) if st.rho_key else None
        if st.kind == "control":
            y = _trunc(x, sig * s, s) if sig is not None else np.clip(x, -s, s)
            return y * _expand(self.val(p, st.gain_key), st.channels, st.spec.tie, hd)
        qm = _qm(st.bits)
        if st.folded:
            s = np.ones(st.channels)
        if site == "v_cache" and f"layers.{layer}.o_in" in self.f:
            s = s / self.f[f"layers.{layer}.o_in"]
        y = _trunc(x, sig * s * qm, s * qm) if sig is not None else x
        u = y / s
        if self.recording:
            self.frozen[key] = (np.rint(u) - u, u < -qm, u > qm)   # LSQ: clip if |u| > qmax
        d0, lo, hi = self.frozen[key]
        return np.where(lo, -qm * s, np.where(hi, qm * s, y + s * d0))


def fd_check(q, ids, R, n=N_FD, seed=3, embed_checks=6):
    g, d_embed, logits = analytic(q, ids, R)
    sur = Surrogate(q, ids)
    np.testing.assert_allclose(sur.logits, logits, atol=SURROGATE_BASE_ATOL, rtol=0,
                               err_msg="surrogate differs from the model at the base point")
    rng = np.random.default_rng(seed)
    entries = [(k, i) for k, v in q.params.items() for i in range(max(1, v.size))]
    pick = [entries[j] for j in rng.choice(len(entries), min(n, len(entries)), replace=False)]
    got, want = [], []
    for k, i in pick:
        def at(delta):
            p = {kk: vv.copy() for kk, vv in sur.p0.items()}
            p[k].reshape(-1)[i] += delta
            return sur.loss(p, q.model.embed_tokens, R)
        want.append((at(FD_STEP) - at(-FD_STEP)) / (2 * FD_STEP))
        got.append(g[k].reshape(-1)[i])
    # input (embedding-output) gradients: perturb embedding rows of tokens present in ids
    E = q.model.embed_tokens
    toks = np.unique(ids)
    for _ in range(embed_checks):
        tok, ch = int(rng.choice(toks)), int(rng.integers(E.shape[1]))
        def at(delta):
            E2 = E.copy(); E2[tok, ch] += delta
            return sur.loss(sur.p0, E2, R)
        want.append((at(FD_STEP) - at(-FD_STEP)) / (2 * FD_STEP))
        got.append(d_embed[ids == tok][:, ch].sum())
    got, want = np.array(got), np.array(want)
    atol = FD_ATOL_REL * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=FD_RTOL, atol=atol)
    return got


CONTROL_PLANS = [
    QuantPlan(w_bits=None, a_bits=None, adapt_control=True, granularity="channel", sink_tokens=2),
    QuantPlan(w_bits=None, a_bits=None, adapt_control=True, granularity="channel"),
    QuantPlan(w_bits=None, a_bits=None, adapt_control=True, granularity="tensor", truncation=True),
    QuantPlan(w_bits=8, a_bits=None, adapt_control=True, granularity="channel", truncation=True,
              quant_head=True),
]


@pytest.mark.parametrize("plan", CONTROL_PLANS, ids=lambda p: p.label)
def test_control_gradients_match_fd_of_true_loss(model, data, plan):
    """No rounding: the surrogate IS the model, so this is FD of the true loss."""
    ids, R = data
    fd_check(prepared(model, plan, ids), ids, R)


def test_fp_plan_input_gradient(model, data):
    """Quantizers off (FP32 plan, no params): d_embed vs FD of the true loss."""
    ids, R = data
    q = quantize(model, QuantPlan(w_bits=None, a_bits=None))
    assert q.params == {}
    fd_check(q, ids, R, n=0, embed_checks=8)


SURROGATE_PLANS = [
    QuantPlan(w_bits=8, a_bits=8),
    QuantPlan(w_bits=8, a_bits=6, truncation=True, kv_bits=6, quant_head=True),
    QuantPlan(w_bits=4, a_bits=4, granularity="channel", truncation=True),
    QuantPlan(w_bits=4, a_bits=6, granularity="channel", kv_bits=8, quant_head=True),
    QuantPlan(w_bits=6, a_bits=5, granularity="channel", fold=False, truncation=True, kv_bits=5),
    QuantPlan(w_bits=8, a_bits=4, granularity="channel", param_space="linear"),
    QuantPlan(w_bits=8, a_bits=8, mode="dynamic"),
    # sink rows: own scales; folded, the body scale also gets the sink rows' LSQ term
    QuantPlan(w_bits=4, a_bits=6, granularity="channel", truncation=True, sink_tokens=2),
    QuantPlan(w_bits=8, a_bits=5, kv_bits=5, sink_tokens=3, quant_head=True),
    QuantPlan(w_bits=8, a_bits=4, granularity="channel", kv_bits=6, sink_tokens=1,
              param_space="linear"),
    # rotated with R3: the k_cache site rounds rotated keys; its gradient passes back through
    # the per-head Hadamard (and the online R4 before down_in)
    QuantPlan(w_bits=8, a_bits=6, rotate=True, rotate_qk=True, kv_bits=5, sink_tokens=1),
    # QuaRot's KV form: dynamic asymmetric per (token, head), straight through
    QuantPlan(w_bits=8, a_bits=6, kv_bits=4, kv_mode="dynamic", kv_clip=0.95),
]


@pytest.mark.parametrize("plan", SURROGATE_PLANS, ids=lambda p: p.label + " " + p.param_space)
def test_ste_gradients_match_fd_of_surrogate(model, data, plan):
    ids, R = data
    q = prepared(model, plan, ids)
    g = fd_check(q, ids, R)
    assert np.any(g != 0)


# --------------------------------------------------------------------------- torch autograd

torch = pytest.importorskip("torch")


def torch_loss(q, ids, R):
    """The same STE/LSQ fake-quant model in torch; returns (loss, logits, params, x0)."""
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
    plan, m, c = q.plan, q.model, q.model.config
    H, KVH, hd = c.num_attention_heads, c.num_key_value_heads, q.head_dim
    G = H // KVH
    P = {k: t(v).requires_grad_() for k, v in q.params.items()}
    sites = {(st.layer, st.name): st for st in q.site_list()}

    def val(k):
        return torch.exp(P[k]) if ".log_" in k else P[k]

    def expand(p, st):
        if p.dim() == 0:
            return p.expand(st.channels)
        if st.spec.tie == 1:
            return p
        return p.reshape(-1, 1, hd).expand(-1, st.spec.tie, hd).reshape(-1)

    folds = {st.key: val(st.scale_key) for st in sites.values() if st.folded}

    def fold_w(w, rk=None, ck=None, expand_c=False):
        w = t(w)
        r = folds.get(rk, torch.ones(w.shape[0], dtype=torch.float64))
        cc = folds.get(ck, torch.ones(w.shape[1], dtype=torch.float64))
        if expand_c and ck in folds:
            cc = cc.reshape(-1, 1, hd).expand(-1, G, hd).reshape(-1)
        wf = w / r[:, None] * cc[None, :]
        if plan.w_bits is None:
            return wf
        qm = 2 ** (plan.w_bits - 1) - 1
        wd = wf.detach()
        s = wd.abs().amax(1, keepdim=True) / qm
        wq = torch.clamp(torch.round(wd / s), -qm, qm) * s
        return (wq * r[:, None] / cc[None, :]).detach() / r[:, None] * cc[None, :]

    def trunc(x, th, ce):
        a = x.abs()
        z = torch.relu(a - th) / (ce - th)
        return torch.where(a <= th, x, torch.sign(x) * (th + (ce - th) * torch.tanh(z)))

    def hook(layer, site, x, fo=None):
        st = sites.get((layer, site))
        if st is None:
            return x
        if st.kind == "dynamic":
            qm = 2 ** (st.bits - 1) - 1
            s = x.detach().abs().amax(-1, keepdim=True) / qm
            return x + (torch.clamp(torch.round(x.detach() / s), -qm, qm) * s - x.detach())
        s = expand(val(st.scale_key), st)
        sig = expand(torch.sigmoid(P[st.rho_key]), st) if st.rho_key else None
        if st.kind == "control":
            y = trunc(x, sig * s, s) if sig is not None else torch.minimum(torch.maximum(x, -s), s)
            return y * expand(val(st.gain_key), st)
        qm = 2 ** (st.bits - 1) - 1
        if st.folded:
            s = torch.ones(st.channels, dtype=torch.float64)
        if site == "v_cache" and fo is not None:
            s = s / fo
        y = trunc(x, sig * s * qm, s * qm) if sig is not None else x
        u = torch.clamp(y / s, -qm, qm)           # LSQ order: clip, then round (STE)
        return s * (u + (torch.round(u) - u).detach())

    def rms(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * g

    B, T = ids.shape
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]      # (T, 1, hd/2)

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x0 = t(m.embed_tokens)[torch.tensor(ids)].detach().requires_grad_()
    x = x0
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i, lw in enumerate(m.layers):
        a, o, ml, d = (f"layers.{i}.{s}" for s in ("attn_in", "o_in", "mlp_in", "down_in"))
        g1 = t(lw.input_layernorm) / folds.get(a, 1.0)
        h = hook(i, "attn_in", rms(x, g1))
        qq = (h @ fold_w(lw.q_proj, None, a).T).reshape(B, T, H, hd)
        kk = (h @ fold_w(lw.k_proj, None, a).T).reshape(B, T, KVH, hd)
        vv = h @ fold_w(lw.v_proj, o, a).T
        qq, kk = rope(qq), rope(kk).reshape(B, T, KVH * hd)
        kk = hook(i, "k_cache", kk)
        vv = hook(i, "v_cache", vv, folds.get(o))
        qh = qq.transpose(1, 2)
        kh = kk.reshape(B, T, KVH, hd).transpose(1, 2).repeat_interleave(G, 1)
        vh = vv.reshape(B, T, KVH, hd).transpose(1, 2).repeat_interleave(G, 1)
        sc = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd)
        att = torch.softmax(sc.masked_fill(mask, -torch.inf), -1) @ vh   # (B, H, T, hd)
        oo = hook(i, "o_in", att.transpose(1, 2).reshape(B, T, H * hd))
        x = x + oo @ fold_w(lw.o_proj, None, o, expand_c=True).T
        g2 = t(lw.post_attention_layernorm) / folds.get(ml, 1.0)
        h2 = hook(i, "mlp_in", rms(x, g2))
        gate = h2 @ fold_w(lw.gate_proj, None, ml).T
        up = h2 @ fold_w(lw.up_proj, d, ml).T
        dd = hook(i, "down_in", torch.nn.functional.silu(gate) * up)
        x = x + dd @ fold_w(lw.down_proj, None, d).T
    hf = hook(c.num_hidden_layers, "head_in", rms(x, t(m.norm) / folds.get("head_in", 1.0)))
    head = fold_w(m.lm_head, None, "head_in") if plan.quant_head else t(m.lm_head)
    logits = hf @ head.T
    loss = (logits * t(R)).sum()
    return loss, logits, P, x0


TORCH_PLANS = [
    QuantPlan(w_bits=4, a_bits=4, granularity="channel", truncation=True, kv_bits=8,
              quant_head=True),
    QuantPlan(w_bits=8, a_bits=6, truncation=True, kv_bits=6),
    QuantPlan(w_bits=6, a_bits=6, granularity="channel", fold=False, kv_bits=8),
    QuantPlan(w_bits=None, a_bits=None, adapt_control=True, granularity="channel", truncation=True),
    QuantPlan(w_bits=8, a_bits=8, mode="dynamic"),
]


@pytest.mark.parametrize("plan", TORCH_PLANS, ids=lambda p: p.label)
def test_scale_gradients_match_torch_autograd(model, data, plan):
    ids, R = data
    q = prepared(model, plan, ids)
    g, d_embed, logits = analytic(q, ids, R)
    loss, tlogits, P, x0 = torch_loss(q, ids, R)
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-10, atol=1e-10)
    loss.backward()
    for k in q.params:
        want = P[k].grad.numpy()
        atol = TORCH_ATOL_REL * max(1.0, np.abs(want).max())
        np.testing.assert_allclose(g[k], want, rtol=TORCH_RTOL, atol=atol, err_msg=k)
    want = x0.grad.numpy()
    np.testing.assert_allclose(d_embed, want, rtol=TORCH_RTOL,
                               atol=TORCH_ATOL_REL * np.abs(want).max())
