"""`sasq.load(path)`: one entry point for every checkpoint format we read.

An HF directory (config.json + safetensors [+ tokenizer]) or a .gguf file becomes a LlamaModel;
no path means the bundled stories260K model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path


def default_model_dir() -> Path:
    """The bundled stories260K model (HF layout, MIT licence; see assets/stories260K/LICENSE)."""
    return Path(__file__).resolve().parent.parent / "assets" / "stories260K"


def load(path=None):
    """Load a HF LLaMA checkpoint directory (config.json + safetensors [+ tokenizer]) or a
    .gguf file. With no path: the bundled stories260K model.

    Anything wrong with the files (corrupt or forged containers, configs, tokenizers, weights
    that are NaN/inf or do not fit the config) is a one-line ValueError whose message starts with
    the file or directory; a missing path is a FileNotFoundError."""
    from sasq.model import LlamaConfig, LlamaModel

    path = default_model_dir() if path is None else Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
        from .gguf import load_gguf
        config_dict, tensors, tokenizer = load_gguf(path)
        with _named(path):
            config = LlamaConfig.from_dict(config_dict)
            return LlamaModel.from_config_and_tensors(config, tensors, tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    from .safetensors import load_checkpoint_dir
    from .tokenizer import load_tokenizer
    if (path / "sasq_engine.json").is_file():
        raise ValueError(f"{path}: an exported integer model; load it with "
                         "sasq.StaticInt8Model.from_pretrained (sasq.load reads float checkpoints)")
    config = LlamaConfig.from_json(cfg)
    tensors = load_checkpoint_dir(path, check_finite=True)
    tokenizer = load_tokenizer(path)
    with _named(path):
        model = LlamaModel.from_config_and_tensors(config, tensors, tokenizer)
    model.source_dir = path  # where tokenizer files live (sasq.export copies them)
    return model


@contextlib.contextmanager
def _named(path):
    """Prefix a ValueError that does not name a file yet (e.g. "missing tensor ...") with path."""
    try:
        yield
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None
