"""Checkpoints in and out: safetensors (read/write), tokenizers, GGUF (reader, dequantization,
tokenizer, conversion to an HF directory) and the `load()` dispatch.

    safetensors.py     validating memory-mapped reader, atomic writer, sharded HF directories
    tokenizer.py       tokenizer.json / tokenizer.model with the checkpoint's BOS/EOS rules
    gguf_reader.py     the GGUF container (header, metadata, tensor table)
    gguf_dequant.py    GGUF block types -> float32
    gguf_tokenizer.py  byte-level BPE tokenizer rebuilt from GGUF metadata
    gguf.py            GGUF LLaMA -> HF names/config/tokenizer; convert_gguf
    load.py            load(path) for an HF directory or a .gguf file; the bundled model's path
"""
from .load import default_model_dir, load
from .safetensors import (MissingTensorError, TensorDict, load_checkpoint_dir, load_safetensors,
                          read_header, save_safetensors)

__all__ = ["load", "default_model_dir", "load_safetensors", "save_safetensors",
           "load_checkpoint_dir", "read_header", "MissingTensorError", "TensorDict"]
