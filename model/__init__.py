"""The LLaMA decoder: config and model. Imports nothing else of this project."""
from .config import LlamaConfig
from .llama import LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
