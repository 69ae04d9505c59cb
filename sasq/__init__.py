"""sasq: static activation quantization of LLaMA-family models by scale-only QAT.

Public names are imported lazily so that `import sasq` stays cheap and the NumPy model works
even while the C core is being rebuilt.
"""
import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "sasq.io",
    "LlamaModel": "sasq.model",
    "LlamaConfig": "sasq.model",
    "perplexity": "sasq.eval",
    "PerplexityResult": "sasq.eval",
    "QuantPlan": "sasq.plan",
    "QuantModel": "sasq.quant",
    "export": "sasq.exporter",
    "StaticInt8Model": "sasq.engine",
    "rotate_model": "sasq.rotate",
    "quantize": "sasq.quant",
    "calibrate": "sasq.calibration",
    "train_scales": "sasq.train",
    "set_num_threads": "sasq.ops",
    "get_num_threads": "sasq.ops",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'sasq' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
