from jaxtune.models.llama import Llama, LlamaConfig, RopeScaling, REMAT_POLICIES

__all__ = ["Llama", "LlamaConfig", "RopeScaling", "REMAT_POLICIES"]
