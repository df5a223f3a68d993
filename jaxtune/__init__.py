"""jaxtune: full-parameter fine-tuning of Llama-family models with JAX."""

__version__ = "0.1.0"
__all__ = ["from_pretrained", "save_pretrained", "Llama", "LlamaConfig", "__version__"]

_LAZY = {
    "from_pretrained": "jaxtune.models.hf_io",
    "save_pretrained": "jaxtune.models.hf_io",
    "Llama": "jaxtune.models.llama",
    "LlamaConfig": "jaxtune.models.llama",
}


def __getattr__(name):
    # Lazy, so that `import jaxtune.host_memory` (run.py's first step, before a possible
    # re-exec) does not import JAX. Submodules too: after a plain `import jaxtune`, the
    # README's `jaxtune.train.run(...)` and `jaxtune.sharding.param_sharding_fn(...)` work.
    import importlib
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
