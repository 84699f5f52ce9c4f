"""VeLoRA and other activation codecs: what the linear layers of a model keep for backward.

`velora.VeLoRAConfig` imports without torch; the layers load on first use of any other name.
"""
from .config import CODECS, VeLoRAConfig

_LAZY = {"VeLoRASummary": "apply", "apply_velora": "apply", "is_codec_state": "apply", "stored_bytes": "apply",
         "strip_state_dict": "apply", "Codec": "codecs", "SubTokenBasis": "codecs", "CompressedLinear": "layer"}
__all__ = ["CODECS", "VeLoRAConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
