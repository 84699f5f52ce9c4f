"""VeLoRA: rank-r sub-token projection of the activations linear layers save for backward."""
from .apply import VeLoRASummary, apply_velora, stored_bytes
from .config import VeLoRAConfig
from .layer import SubTokenBasis, VeLoRALinear

__all__ = ["VeLoRAConfig", "VeLoRALinear", "SubTokenBasis", "VeLoRASummary", "apply_velora", "stored_bytes"]
