"""Export a quantized model as an HF-style directory an integer runtime loads (sasq.export).

(The module is not called export.py: importing a submodule sets the package attribute of the same
name, which would shadow the public function sasq.export.)

    sasq.export(qmodel, "out_dir")      # then sasq.StaticInt8Model.from_pretrained("out_dir")

Layout (written to a temporary directory beside out_dir, then renamed: a crash never leaves a
half export):
    config.json                 the LlamaConfig + `quantization_config`
    model.safetensors           float32 embed_tokens, RMSNorm gains (per-channel factors folded
                                in), lm_head; per linear `.weight` int8 (out, in) codes,
                                `.weight_scale` float32 (out, 1), `.input_scale` float32 (1,)
                                (q/k/v share attn_in's, gate/up share mlp_in's)
    tokenizer files             copied from the model directory when it has them
    sasq_engine.json            the sasq extensions (always written; see below)
    sasq_extensions.safetensors their arrays (sink scales, truncation thresholds, KV scales)

Compressed-tensors vocabulary: a plan with 8-bit weights and activations, static per-tensor
activation scales in the domain the integer GEMM sees (per-channel factors folded into the
producer and the consumer), no sink rows, no truncation, no rotation with an online transform, no
KV-cache or lm_head quantization is written with quant_method "compressed-tensors", format
"int-quantized", weights {8 bits, int, symmetric, channel}, input_activations {8 bits, int,
symmetric, tensor, dynamic false}, ignore ["lm_head"]: transformers + compressed-tensors load it
(their grid is [-128, 127], ours [-127, 127]: see tests/test_export.py for the budget). Any other
deployable plan keeps the same fields but says quant_method "sasq" and model_type
"sasq_static_llama", so a consumer that does not know the extensions refuses the directory instead
of computing something else (transformers ignores an unknown quant_method with a warning and
would read the int8 codes as float weights; it refuses an unknown model type).

sasq_engine.json (format version 1): {"format", "plan" (QuantPlan.to_dict), "bits", "sites":
{"layers.3.attn_in": {"kind": "static"|"dynamic", "bits", "scale" (the per-tensor applied
scale), "sink": tensor name | null, "threshold": tensor name | null, ...}}, "online_down",
"kv": {...}, "rotation", "expressible_by_compressed_tensors"}.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sasq.io.safetensors import save_safetensors
from sasq.transforms import WEIGHT_NAMES

ENGINE_FILE = "sasq_engine.json"
SASQ_MODEL_TYPE, SASQ_ARCHITECTURE = "sasq_static_llama", "SasqStaticLlamaForCausalLM"
EXT_FILE = "sasq_extensions.safetensors"
FORMAT_VERSION = 2  # sasq.engine.FORMAT_VERSION: 2 added online_qk, online_down_small, dynamic_kv
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
           "down_proj": "mlp.down_proj"}
_INPUT_SITE = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


def deployable_problem(plan) -> str | None:
    """Why a plan is not an integer model (None when it is)."""
    if plan.adapt_control:
        return "the adapted-FP32 control has no integer form"
    if plan.w_bits is None or plan.a_bits is None:
        return "an integer model needs quantized weights and activations (w_bits and a_bits)"
    if plan.granularity == "channel" and not plan.fold:
        return ("fake per-channel activation scales are not an integer GEMM (use fold=True, the "
                "folded form)")
    if set(plan.sites) != {"attn_in", "o_in", "mlp_in", "down_in"}:
        return "every linear input must be quantized (sites = attn_in, o_in, mlp_in, down_in)"
    return None


def ct_expressible(plan) -> bool:
    return (plan.w_bits == 8 and plan.a_bits == 8 and plan.mode == "static" and not plan.truncation
            and not plan.sink_tokens and not plan.kv_bits and not plan.quant_head
            and not plan.rotate)


def quantization_config(plan) -> dict:
    """The compressed-tensors description (quant_method "sasq" when extensions are needed)."""
    acts = {"num_bits": plan.a_bits, "type": "int", "symmetric": True,
            "strategy": "token" if plan.mode == "dynamic" else "tensor",
            "dynamic": plan.mode == "dynamic"}
    group = {"targets": ["Linear"],
             "weights": {"num_bits": plan.w_bits, "type": "int", "symmetric": True,
                         "strategy": "channel", "dynamic": False},
             "input_activations": acts}
    return {"quant_method": "compressed-tensors" if ct_expressible(plan) else "sasq",
            "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": [] if plan.quant_head else ["lm_head"],
            "sasq_extensions": ENGINE_FILE}


def export(qmodel, out_dir, overwrite: bool = False) -> Path:
    """Write qmodel (a calibrated/trained QuantModel of a deployable plan) to out_dir."""
    from sasq.quant import QuantModel
    if not isinstance(qmodel, QuantModel):
        raise TypeError(f"export needs a QuantModel, got {type(qmodel).__name__}")
    plan = qmodel.plan
    why = deployable_problem(plan)
    if why:
        raise ValueError(f"{plan.label}: cannot export: {why}")
    qmodel._check_ready()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    deploy, cfg = qmodel.deploy, qmodel.config
    qw = qmodel.quantized_weights()
    tensors = {"model.embed_tokens.weight": np.asarray(deploy.embed_tokens, np.float32),
               "model.norm.weight": np.asarray(deploy.norm, np.float32)}
    ext: dict[str, np.ndarray] = {}
    sites_doc: dict[str, dict] = {}

    for key, site in ((s.key, s) for s in qmodel.site_list()):
        d = {"kind": site.kind, "bits": site.bits}
        if site.kind == "dynamic":
            d["clip"] = float(site.clip)
        elif site.kind == "dynamic_kv":  # per token and KV head, asymmetric (sasq.kvquant)
            d["clip"], d["group"] = float(site.clip), int(cfg.head_dim)
        else:
            scale = np.asarray(site.applied_scale, np.float32)
            if scale.ndim:  # v_cache under an o_in fold: per KV channel
                ext[f"{key}.scale"] = scale
                d["scale"] = f"{key}.scale"
            else:
                d["scale"] = float(scale)
            if site.sink_key:
                ext[f"{key}.sink_scale"] = np.asarray(site.s_sink, np.float32)
                d["sink"] = f"{key}.sink_scale"
            if site.truncation:
                t = np.asarray(site.t, np.float32)
                ext[f"{key}.threshold"] = np.atleast_1d(t)
                d["threshold"] = f"{key}.threshold"
        sites_doc[key] = d

    for i, lw in enumerate(deploy.layers):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = np.asarray(lw.input_layernorm, np.float32)
        tensors[pre + "post_attention_layernorm.weight"] = np.asarray(lw.post_attention_layernorm,
                                                                     np.float32)
        for name in WEIGHT_NAMES:
            codes, scales = qw[(i, name)]
            base = pre + _MODULE[name]
            tensors[base + ".weight"] = np.ascontiguousarray(codes, np.int8)
            tensors[base + ".weight_scale"] = np.asarray(scales, np.float32).reshape(-1, 1)
            s = sites_doc[f"layers.{i}.{_INPUT_SITE[name]}"]
            if s["kind"] == "static":
                tensors[base + ".input_scale"] = np.asarray([s["scale"]], np.float32)
    if plan.quant_head:
        from sasq.transforms import quantize_weight
        codes, scales = quantize_weight(np.asarray(deploy.lm_head, np.float32), plan.w_bits)
        tensors["lm_head.weight"] = codes
        tensors["lm_head.weight_scale"] = scales.reshape(-1, 1)
        if sites_doc["head_in"]["kind"] == "static":
            tensors["lm_head.input_scale"] = np.asarray([sites_doc["head_in"]["scale"]], np.float32)
    else:
        tensors["lm_head.weight"] = np.asarray(deploy.lm_head, np.float32)

    config = cfg.to_dict()
    config["tie_word_embeddings"] = False  # lm_head is written out (folds and rotation untie)
    config["quantization_config"] = quantization_config(plan)
    if not ct_expressible(plan):
        # transformers only warns on an unknown quant_method and would read the int8 codes as
        # float weights; an unknown model type makes every other consumer refuse the directory
        config["model_type"], config["architectures"] = SASQ_MODEL_TYPE, [SASQ_ARCHITECTURE]
    small = getattr(deploy, "online_down_small", None)  # R4 factor of a size without Hadamard
    if small is not None:
        ext["online_down.small"] = np.ascontiguousarray(small, np.float32)
    engine = {"format": FORMAT_VERSION, "plan": plan.to_dict(), "label": plan.label,
              "sites": sites_doc, "online_down": bool(deploy.online_down),
              "online_qk": bool(getattr(deploy, "online_qk", False)),
              "online_down_small": None if small is None else "online_down.small",
              "rotation": getattr(qmodel.model, "rotation", None),
              "expressible_by_compressed_tensors": ct_expressible(plan),
              "grid": "symmetric [-qmax, qmax], qmax = 2^(bits-1) - 1; round half to even",
              "activation_scale_domain": "the input as it arrives at the linear (per-channel "
                                         "factors already folded into norms and producer rows)"}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_safetensors(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        save_safetensors(tmp / EXT_FILE, ext or {"empty": np.zeros(1, np.float32)})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / ENGINE_FILE).write_text(json.dumps(engine, indent=1) + "\n")
        src = getattr(qmodel.model, "source_dir", None)
        for f in TOKENIZER_FILES:
            if src is not None and (Path(src) / f).is_file():
                shutil.copyfile(Path(src) / f, tmp / f)
        if qmodel.tokenizer is not None and not any((tmp / f).exists() for f in TOKENIZER_FILES[:2]):
            _write_tokenizer(qmodel.tokenizer, tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(tok, directory: Path) -> None:
    """A tokenizer without a source directory (GGUF): its tokenizers-library form and the BOS
    rule (tokenizer_config.json), which sasq.io.load_tokenizer reads back."""
    if tok.kind != "tokenizers":
        return
    backend = tok._backend
    (directory / "tokenizer.json").write_text(backend.to_str())
    tc = {"add_bos_token": tok.add_bos, "add_eos_token": False}
    for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if i is not None:
            tc[name] = backend.id_to_token(i)
    (directory / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
