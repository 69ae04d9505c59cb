"""GGUF (llama.cpp) LLaMA models -> HF config, float32 tensors under HF names, and a tokenizer.

    config, tensors, tokenizer = load_gguf("model.gguf")     # sasq.load("model.gguf") uses this
    convert_gguf("model.gguf", "out_dir")                      # config.json + model.safetensors + tokenizer

Pieces: sasq/io/gguf_reader.py (container), sasq/io/gguf_dequant.py (block types -> float32),
sasq/io/gguf_tokenizer.py (BPE tokenizer from metadata). This file maps llama.cpp's names and q/k row
order to HF's LlamaForCausalLM layout.

q/k rows: HF's Llama applies RoPE in rotate_half form (dims i and i + hd/2 rotate together), llama.cpp
in interleaved form (dims 2i and 2i+1). convert_hf_to_gguf therefore reorders each head's rows of
attn_q/attn_k: HF row (j*hd/2 + i) [j in {0,1}] is stored at row (2i + j). We undo that here.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import processors

from sasq.atomic import atomic_write
from .gguf_dequant import KNOWN_UNSUPPORTED_SIZES, TYPE_NAMES, TYPE_SIZES, dequantize
from .gguf_reader import read_gguf
from .gguf_tokenizer import KNOWN_PRE, build_bpe_tokenizer, special_ids

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# tensors llama.cpp writes that carry nothing our model needs (RoPE tables recomputed from config)
_IGNORED = ("rope_freqs.weight",)


def hf_name(name: str, path="GGUF") -> str:
    """llama.cpp tensor name -> HF LlamaForCausalLM name; unknown names are an error, not dropped."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"{path}: tensor {name!r} has no LLaMA (HF) counterpart")


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's per-head interleave of q/k rows. w: (n_heads*hd, C)."""
    rows = w.shape[0]
    hd = rows // n_heads
    # stored row 2i+j of a head <- HF row j*hd/2+i: view as (head, i, j) and swap to (head, j, i)
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF row order -> llama.cpp's (the forward of unpermute_qk; used by tests to forge files)."""
    hd = w.shape[0] // n_heads
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _meta(meta, key, path, kind=int, default=None):
    v = meta.get(key, default)
    if v is None:
        raise ValueError(f"{path}: metadata {key!r} is missing")
    if kind is int and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))):
        raise ValueError(f"{path}: metadata {key!r} should be an integer, got {_short(v)}")
    if kind is float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ValueError(f"{path}: metadata {key!r} should be a number, got {_short(v)}")
        # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest float32 spelling
        with np.errstate(over="ignore"):
            f = float(str(np.float32(v)))
        if not np.isfinite(f):
            raise ValueError(f"{path}: metadata {key!r} must be finite in float32, got {v!r}")
        return f
    return kind(v)


def _short(v, n=60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def gguf_config(meta: dict, tensor_shapes: dict, path="GGUF") -> dict:
    """HF config.json dict (LlamaForCausalLM) from llama.* metadata."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch != "llama":
        raise ValueError(f"{path}: general.architecture {_short(arch)} is not supported (only 'llama')")
    g = lambda k, kind=int, default=None: _meta(meta, f"llama.{k}", path, kind, default)  # noqa: E731
    hidden = g("embedding_length")
    n_heads = g("attention.head_count")
    n_kv = g("attention.head_count_kv", default=n_heads)
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv or hidden % n_heads:
        raise ValueError(f"{path}: inconsistent heads: hidden {hidden}, heads {n_heads}, kv heads {n_kv}")
    head_dim = g("attention.key_length", default=hidden // n_heads)
    rot = g("rope.dimension_count", default=head_dim)
    if rot != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count {rot} != head_dim {head_dim} (partial RoPE unsupported)")
    if head_dim % 2:
        raise ValueError(f"{path}: head_dim {head_dim} is odd")
    emb = tensor_shapes.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab = g("vocab_size", default=emb[0])
    if emb != (vocab, hidden):
        raise ValueError(f"{path}: token_embd.weight has shape {emb}, expected {(vocab, hidden)}")
    rope_scaling = None
    stype = meta.get("llama.rope.scaling.type", "none")
    if not isinstance(stype, str):
        raise ValueError(f"{path}: llama.rope.scaling.type should be a string, got {_short(stype)}")
    if stype == "linear":
        factor = g("rope.scaling.factor", float)
        if not factor > 0:
            raise ValueError(f"{path}: llama.rope.scaling.factor must be > 0, got {factor}")
        rope_scaling = {"rope_type": "linear", "factor": factor}
    elif stype != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type {_short(stype)} is not supported")
    n_layers = g("block_count")
    # each layer is 9 tensors: bound the claim by the file before anything loops over layers
    # (llama.block_count = 2**32-1 made _expected_shapes build billions of names)
    if n_layers * len(_LAYER_NAMES) > len(tensor_shapes):
        raise ValueError(f"{path}: llama.block_count {n_layers} needs {n_layers * len(_LAYER_NAMES)} "
                         f"layer tensors but the file holds {len(tensor_shapes)} tensors")
    bos, eos, _ = special_ids(meta, vocab, path) if "tokenizer.ggml.tokens" in meta else (None, None, False)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon", float),
        "rope_theta": g("rope.freq_base", float, 10000.0),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": g("context_length", default=2048),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    # every field LlamaConfig checks (positive sizes, finite rope_theta, context_length within
    # LlamaConfig.MAX_POSITIONS, ...), named by the file, before any tensor is dequantized;
    # rope_scaling is left to the loader (linear scaling converts for transformers)
    from sasq.model import LlamaConfig
    try:
        LlamaConfig.from_dict({**cfg, "rope_scaling": None})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def _expected_shapes(cfg: dict) -> dict:
    C, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, H, KV = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    per = {"input_layernorm": (C,), "self_attn.q_proj": (H * hd, C), "self_attn.k_proj": (KV * hd, C),
           "self_attn.v_proj": (KV * hd, C), "self_attn.o_proj": (C, H * hd),
           "post_attention_layernorm": (C,), "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C),
           "mlp.down_proj": (C, I)}
    for i in range(cfg["num_hidden_layers"]):
        for k, s in per.items():
            shapes[f"model.layers.{i}.{k}.weight"] = s
    return shapes


def load_gguf_tensors(path, progress=False):
    """(config dict, {HF name: float32 array}, metadata dict) of a LLaMA GGUF file."""
    f = read_gguf(path, {**TYPE_SIZES, **KNOWN_UNSUPPORTED_SIZES})
    shapes = {n: t.shape for n, t in f.tensors.items()}
    cfg = gguf_config(f.metadata, shapes, f.path)
    expected = _expected_shapes(cfg)
    names = [n for n in f.tensors if n not in _IGNORED]
    it = names
    if progress:
        from sasq.progress import bar
        it = bar(names, desc="dequantize", unit="tensor", leave=True)
    tensors = {}
    for name in it:
        t = f.tensors[name]
        hf = hf_name(name, f.path)
        if hf not in expected:
            raise ValueError(f"{f.path}: tensor {name!r} does not belong to a {cfg['num_hidden_layers']}-layer model")
        if t.shape != expected[hf]:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {t.shape}, expected {expected[hf]}")
        if t.ggml_type not in TYPE_NAMES:
            raise ValueError(f"{f.path}: tensor {name!r}: ggml type {t.ggml_type} cannot be dequantized "
                             f"(supported: {', '.join(TYPE_NAMES.values())})")
        w = dequantize(f.tensor_bytes(name), t.ggml_type, t.shape)
        if not np.isfinite(w).all():
            raise ValueError(f"{f.path}: tensor {name!r} has non-finite values after dequantization")
        if hf.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        tensors[hf] = w
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{f.path}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return cfg, tensors, f.metadata


def gguf_hf_tokenizer(meta: dict, path="GGUF"):
    """(tokenizers.Tokenizer, bos_id, eos_id, add_bos) from GGUF metadata."""
    tok = build_bpe_tokenizer(meta, str(path))
    bos, eos, add_bos = special_ids(meta, len(meta["tokenizer.ggml.tokens"]), path)
    return tok, bos, eos, add_bos


def load_gguf(path, progress=False):
    """(HF config dict, {HF name: float32 np.ndarray}, sasq.tokenizer.Tokenizer or None)."""
    cfg, tensors, meta = load_gguf_tensors(path, progress=progress)
    tokenizer = None
    if _has_bpe_tokenizer(meta, path):
        from .tokenizer import Tokenizer
        tok, bos, eos, add_bos = gguf_hf_tokenizer(meta, path)
        try:
            tokenizer = Tokenizer.from_tokenizers(tok, bos_id=bos, eos_id=eos, add_bos=add_bos)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return cfg, tensors, tokenizer


def _has_bpe_tokenizer(meta, path) -> bool:
    """True for a byte-level BPE vocabulary; other kinds (sentencepiece "llama", ...) load the weights
    without a tokenizer and say so, rather than refusing the whole model."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return False
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(kind, str) or kind != "gpt2" or not isinstance(pre, str) or pre not in KNOWN_PRE:
        what = (f"tokenizer.ggml.pre {_short(pre)}" if isinstance(kind, str) and kind == "gpt2"
                else f"tokenizer.ggml.model {_short(kind)}")
        warnings.warn(f"{path}: {what} is not supported (byte-level BPE 'gpt2' with pre-tokenizer "
                      f"{', '.join(KNOWN_PRE)}); loading without a tokenizer", RuntimeWarning, stacklevel=3)
        return False
    return True


def _write_json(path: Path, obj):
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def convert_gguf(path, out_dir, progress=False) -> Path:
    """Write an HF-style directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) that both sasq.load and transformers load. Returns out_dir."""
    from .safetensors import save_safetensors

    cfg, tensors, meta = load_gguf_tensors(path, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt", "source": Path(path).name})
    if _has_bpe_tokenizer(meta, path):
        tok, bos, eos, add_bos = gguf_hf_tokenizer(meta, path)
        if add_bos and bos is not None:
            # transformers' fast tokenizer adds BOS only through a post-processor; sasq's Tokenizer
            # encodes without special tokens and adds BOS itself, so this never doubles it there
            bos_tok = meta["tokenizer.ggml.tokens"][bos]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B", special_tokens=[(bos_tok, bos)])
        with atomic_write(out / "tokenizer.json", "w") as fh:
            fh.write(tok.to_str(pretty=True))
        tokens = meta["tokenizer.ggml.tokens"]
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": False,
              "model_max_length": cfg["max_position_embeddings"], "clean_up_tokenization_spaces": False}
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= int(i) < len(tokens):
                tc[name] = tokens[int(i)]
        if isinstance(meta.get("tokenizer.chat_template"), str):
            tc["chat_template"] = meta["tokenizer.chat_template"]
        _write_json(out / "tokenizer_config.json", tc)
    _write_json(out / "config.json", cfg)   # last: a directory with config.json is complete
    return out
