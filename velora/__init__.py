"""VeLoRA and other activation codecs: what the linear layers of a model keep for backward."""
from .apply import VeLoRASummary, apply_velora, is_codec_state, stored_bytes, strip_state_dict
from .codecs import Codec, SubTokenBasis
from .config import CODECS, VeLoRAConfig
from .layer import VeLoRALinear

__all__ = ["CODECS", "Codec", "SubTokenBasis", "VeLoRAConfig", "VeLoRALinear", "VeLoRASummary", "apply_velora",
           "is_codec_state", "stored_bytes", "strip_state_dict"]
