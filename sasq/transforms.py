"""Pure weight transforms: LlamaModel -> LlamaModel, or -> int8 codes + scales.

No function here keeps state or writes into its arguments: the fake-quant training model
(sasq.quant), the export and the integer engine all call the same functions, so that what is
trained is what is deployed.

Per-channel folds (DESIGN section 2). A fold is a dict site key -> factor f (fold shape): the
producer of the site's input is divided by f and its consumers' input columns are multiplied by f,
which leaves the FP function unchanged and divides the site's activation by f:

    site      producer (divided)                    consumers (columns multiplied)
    attn_in   input_layernorm gain                  q_proj, k_proj, v_proj
    o_in      v_proj rows (one per KV channel)      o_proj (f expanded over the GQA group)
    mlp_in    post_attention_layernorm gain         gate_proj, up_proj
    down_in   up_proj rows                          down_proj
    head_in   final norm gain                       lm_head (untied from embed_tokens)

Each matrix is formed as w * col[None, :] / row[:, None] (in that order), then rounded per output
channel (symmetric RTN, scale absmax/qmax) when weights are quantized.
"""
from __future__ import annotations

import numpy as np

from sasq.sites import tie_expand, tie_reduce_max

# matrix -> (site whose factor multiplies its columns, site whose factor divides its rows)
MATRIX_FOLDS = {
    "q_proj": ("attn_in", None), "k_proj": ("attn_in", None), "v_proj": ("attn_in", "o_in"),
    "o_proj": ("o_in", None), "gate_proj": ("mlp_in", None), "up_proj": ("mlp_in", "down_in"),
    "down_proj": ("down_in", None),
}
NORM_FOLDS = {"input_layernorm": "attn_in", "post_attention_layernorm": "mlp_in"}
CONSUMERS = {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",),
             "mlp_in": ("gate_proj", "up_proj"), "down_in": ("down_proj",)}
WEIGHT_NAMES = tuple(MATRIX_FOLDS)
MIN_SMOOTH = 1e-5


# --------------------------------------------------------------------------- rounding

def _kernels(dtype):
    """float32 -> the C kernels (sasq.ops); other float dtypes -> their NumPy twins."""
    if np.dtype(dtype) == np.float32:
        from sasq import ops
        return ops
    from sasq import reference
    return reference


def quantize_weight(w: np.ndarray, bits: int):
    """Per-output-channel symmetric RTN: (codes (out, in) int8, scales (out,)) with
    w ~ codes * scales[:, None]; scale = absmax(row)/qmax (1 for an all-zero row)."""
    return _kernels(w.dtype).fold_quantize_weight(np.ascontiguousarray(w), bits)


def fake_quant_weight(w: np.ndarray, bits: int | None) -> np.ndarray:
    """scale * clamp(rint(w / scale)) per output row: the numbers quantize_weight's codes give
    (codes * scales in w's dtype). bits None: w itself."""
    return fold_quant_matrix(w, None, None, bits, w.dtype)


# --------------------------------------------------------------------------- folds

def matrix_factors(folds: dict, layer: int, name: str, config):
    """(col, row) factors of one matrix of decoder layer `layer` under `folds` (None: none);
    o_proj's column factor is expanded over the GQA group."""
    col_site, row_site = MATRIX_FOLDS[name]
    col = folds.get(f"layers.{layer}.{col_site}")
    row = folds.get(f"layers.{layer}.{row_site}") if row_site else None
    if col is not None and name == "o_proj":
        col = tie_expand(col, config.n_groups, config.head_dim)
    return col, row


def fold_matrix(w: np.ndarray, col=None, row=None) -> np.ndarray:
    """w * col[None, :] / row[:, None] (either may be None; two roundings, in this order)."""
    return fold_quant_matrix(w, col, row, None, w.dtype)


def fold_quant_matrix(w, col, row, bits: int | None, dtype) -> np.ndarray:
    """The weight the fake-quant model uses: fold, then per-row RTN, contiguous in dtype
    (w itself when there is nothing to do)."""
    if col is None and row is None and bits is None:
        return np.ascontiguousarray(w, dtype=dtype)
    w = np.ascontiguousarray(w, dtype=dtype)
    return _kernels(dtype).fold_quant_weight(w, bits, col, row)


def fold_norm(g: np.ndarray, f) -> np.ndarray:
    return g if f is None else g / f


def fake_quant_model(model, folds: dict, w_bits: int | None, quant_head: bool = False,
                     memo: dict | None = None, fixed: dict | None = None, int8: bool = False):
    """The model with `folds` applied and its linear weights rounded (RTN per output channel,
    after the fold); lm_head is rounded only with quant_head. `fixed` ((layer, matrix) -> weight)
    replaces the rounding of those matrices (GPTQ; no fold may touch them, fixed[k] = (codes,
    scales)). `memo` (optional, owned by the caller) maps (layer, matrix) -> (factors' bytes,
    result) and skips matrices whose factors did not change since the last call; the result never
    depends on it. int8=True (float32, w_bits set): the model also gets `int8_weights`, every
    linear's codes packed for sasq.ops.linear_int8 with its scales (sasq.qtensor)."""
    dt = model.dtype
    cfg = model.config
    int8 = int8 and w_bits is not None and dt == np.float32
    packed = {}
    layers = []
    for i, lw in enumerate(model.layers):
        new = {}
        for name in WEIGHT_NAMES:
            col, row = matrix_factors(folds, i, name, cfg)
            sig = (None if col is None else col.tobytes(), None if row is None else row.tobytes(),
                   int8)
            hit = memo.get((i, name)) if memo is not None else None
            if hit is not None and hit[0] == sig:
                new[name], p = hit[1], hit[2]
            elif fixed is not None and (i, name) in fixed:
                if col is not None or row is not None:
                    raise ValueError(f"layer {i} {name}: a fixed (GPTQ) weight cannot be folded")
                codes, scales = fixed[(i, name)]
                new[name] = np.ascontiguousarray(codes.astype(dt) * scales.astype(dt)[:, None])
                p = _pack(codes, scales) if int8 else None
            elif int8:
                w = np.ascontiguousarray(getattr(lw, name), dtype=dt)
                new[name], codes, scales = _kernels(dt).fold_quant_weight_codes(w, w_bits, col, row)
                p = _pack(codes, scales)
            else:
                new[name], p = fold_quant_matrix(getattr(lw, name), col, row, w_bits, dt), None
            if memo is not None:
                memo[(i, name)] = (sig, new[name], p)
            if p is not None:
                packed[(i, name)] = p
        for name, site in NORM_FOLDS.items():
            new[name] = np.asarray(fold_norm(getattr(lw, name), folds.get(f"layers.{i}.{site}")), dt)
        layers.append(type(lw)(**new))
    fields = {"layers": layers}
    fh = folds.get("head_in")
    if fh is not None or (quant_head and w_bits is not None):
        sig = None if fh is None else fh.tobytes()
        hit = memo.get("lm_head") if memo is not None else None
        if hit is not None and hit[0] == sig:
            head = hit[1]
        else:
            head = fold_quant_matrix(model.lm_head, fh, None, w_bits if quant_head else None, dt)
            if memo is not None:
                memo["lm_head"] = (sig, head)
        fields.update(norm=np.asarray(fold_norm(model.norm, fh), dt), lm_head=head)
    out = model.copy_with(**fields)
    out.int8_weights = packed or None
    return out


def _pack(codes, scales):
    from sasq import ops
    return ops.pack_weights(np.ascontiguousarray(codes, np.int8)), np.asarray(scales, np.float32)


def fold_norms(model, dtype=None):
    """Every RMSNorm gain multiplied into the input columns of the linears that read the norm
    (q/k/v, gate/up, lm_head); the norms keep only their normalization (gain 1). The result is
    in `dtype` (default the model's). lm_head takes the final norm's gain, so tied embeddings
    come out untied."""
    dt = np.dtype(dtype or model.dtype)
    layers = []
    for lw in model.layers:
        new = {n: np.asarray(getattr(lw, n), dtype=dt) for n in WEIGHT_NAMES}
        for norm, site in NORM_FOLDS.items():
            g = np.asarray(getattr(lw, norm), dtype=dt)
            for n in CONSUMERS[site]:
                new[n] = new[n] * g[None, :]
            new[norm] = np.ones_like(g)
        layers.append(type(lw)(**new))
    g = np.asarray(model.norm, dtype=dt)
    return model.copy_with(layers=layers, norm=np.ones_like(g),
                           embed_tokens=np.asarray(model.embed_tokens, dtype=dt),
                           lm_head=np.asarray(model.lm_head, dtype=dt) * g[None, :])


def quantized_weights(model, folds: dict, bits: int) -> dict:
    """(layer, matrix) -> (int8 codes, scales) of every decoder linear after `folds`, RTN per
    output channel: what fake_quant_model's weights are, as integers (export, engine)."""
    out = {}
    for i, lw in enumerate(model.layers):
        for name in WEIGHT_NAMES:
            col, row = matrix_factors(folds, i, name, model.config)
            w = np.ascontiguousarray(getattr(lw, name))
            out[(i, name)] = _kernels(w.dtype).fold_quantize_weight(w, bits, col, row)
    return out


def fold_scales(model, folds: dict):
    """The FP model with `folds` applied (no rounding): the same function up to float rounding."""
    return fake_quant_model(model, folds, None)


# --------------------------------------------------------------------------- SmoothQuant

def smoothing_factors(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
    """SmoothQuant (Xiao et al. 2023): f = act^alpha / w^(1-alpha) per input channel; channels
    with a zero or non-finite statistic keep f = 1; f >= MIN_SMOOTH."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax {a.shape} and weight_absmax {w.shape} differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    f = np.ones_like(a)
    f[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.maximum(f, MIN_SMOOTH)


def consumer_column_absmax(model, layer: int, site: str) -> np.ndarray:
    """max |W[:, j]| over every FP consumer of a site, in the site's fold shape (o_in: max over
    the query heads of each KV head)."""
    if site == "head_in":
        return np.abs(model.lm_head).max(axis=0)
    lw = model.layers[layer]
    w = np.max([np.abs(getattr(lw, n)).max(axis=0) for n in CONSUMERS[site]], axis=0)
    if site == "o_in":
        w = tie_reduce_max(w, model.config.n_groups, model.config.head_dim)
    return w


def smoothquant_folds(model, act_absmax: dict, alpha: float, dtype) -> dict:
    """Fold factors for every site key in act_absmax (per-channel activation absmax in fold
    shape) from the model's consumer weights."""
    out = {}
    for key, a in act_absmax.items():
        layer, site = _parse_key(key, model.config.num_hidden_layers)
        w = consumer_column_absmax(model, layer, site)
        out[key] = smoothing_factors(a, w, alpha).astype(dtype)
    return out


def _parse_key(key: str, n_layers: int):
    if key == "head_in":
        return n_layers, "head_in"
    _, i, site = key.split(".")
    return int(i), site
