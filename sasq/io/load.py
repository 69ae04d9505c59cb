"""`sasq.load(path)`: one entry point for every checkpoint format we read.

An HF directory (config.json + safetensors [+ tokenizer]) or a .gguf file becomes a LlamaModel;
no path means the bundled stories260K model.
"""
from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """The bundled stories260K model (HF layout, MIT licence; see assets/stories260K/LICENSE)."""
    return Path(__file__).resolve().parent.parent / "assets" / "stories260K"


def load(path=None):
    """Load a HF LLaMA checkpoint directory (config.json + safetensors [+ tokenizer]) or a
    .gguf file. With no path: the bundled stories260K model."""
    from sasq.model import LlamaConfig, LlamaModel

    path = default_model_dir() if path is None else Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from .gguf import load_gguf
        config_dict, tensors, tokenizer = load_gguf(path)
        return LlamaModel.from_config_and_tensors(config_dict, tensors, tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    from .safetensors import load_checkpoint_dir
    from .tokenizer import load_tokenizer
    config = LlamaConfig.from_json(cfg)
    tensors = load_checkpoint_dir(path)
    return LlamaModel.from_config_and_tensors(config, tensors, load_tokenizer(path))
