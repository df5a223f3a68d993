"""jaxtune: full-parameter fine-tuning of Llama-family models with JAX."""

from jaxtune.models.hf_io import from_pretrained, save_pretrained
from jaxtune.models.llama import Llama, LlamaConfig

__version__ = "0.1.0"
__all__ = ["from_pretrained", "save_pretrained", "Llama", "LlamaConfig", "__version__"]
