"""VeLoRA: rank-r sub-token projection of the activations linear layers save for backward."""
from .config import VeLoRAConfig

__all__ = ["VeLoRAConfig"]
