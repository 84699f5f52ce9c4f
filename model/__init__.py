"""The LLaMA decoder: config and model. Imports nothing else of this project.

The config imports without torch (so a run config is validated in a fraction of a second); the model
and its torch import load on first use of `model.LlamaForCausalLM`.
"""
from .config import LlamaConfig

__all__ = ["LlamaConfig", "LlamaForCausalLM"]


def __getattr__(name):
    if name == "LlamaForCausalLM":
        from .llama import LlamaForCausalLM
        return LlamaForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
