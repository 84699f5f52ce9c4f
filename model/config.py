"""LlamaConfig: the decoder's shape, read from GaLore's (Hugging Face) model JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, check_positive, check_range

# Keys that appear in GaLore's / HF's JSON but mean nothing to a from-scratch model: accepted, ignored.
_INFORMATIONAL_KEYS = {"architectures", "model_type", "transformers_version", "use_cache", "torch_dtype",
                       "hidden_act"}


@dataclass
class LlamaConfig:
    """Shape of a LLaMA decoder. Field names are Hugging Face's, so GaLore's configs load unchanged.

    The last three fields are memory options of ours (not in HF's config): they change what autograd
    keeps for backward, never the function the model computes.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    max_sequence_length: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    rope_theta: float = 10000.0
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = -1
    # Compute the LM-head + cross-entropy in chunks of this many tokens, recomputing each chunk's
    # logits in backward, so the full-vocabulary fp32 logits are never kept (0 = off).
    loss_chunk_size: int = 0
    # Recompute SwiGLU's silu(gate) * up in backward instead of keeping its two intermediates.
    recompute_swiglu: bool = False
    # Checkpoint every decoder layer (keep only its input; recompute the layer in backward).
    activation_checkpointing: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool}[f.type]
            if isinstance(value, bool) != (f.type == "bool") or not isinstance(value, expected):
                raise ConfigError(f"model.{f.name}: expected {f.type}, got {value!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_sequence_length"):
            check_positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; change one of them")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError(f"model: head dimension {self.head_dim} must be even for rotary embeddings; change "
                              f"model.hidden_size or model.num_attention_heads")
        check_range("model.loss_chunk_size", self.loss_chunk_size, 0)
        # Values that make every forward NaN: refused here rather than reported as a diverged loss.
        check_positive("model.initializer_range", self.initializer_range)
        check_positive("model.rope_theta", self.rope_theta)
        check_range("model.rms_norm_eps", self.rms_norm_eps, 0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Build from a dict of HF/GaLore keys; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - _INFORMATIONAL_KEYS)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        if "max_position_embeddings" in d and "max_sequence_length" not in d:
            d = {**d, "max_sequence_length": d["max_position_embeddings"]}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        """Read a GaLore/HF model JSON (or a run config's `model` section saved on its own)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """A `transformers` LlamaConfig dict describing the same model (used by export)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_sequence_length, "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range, "rope_theta": self.rope_theta,
            "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": None if self.pad_token_id < 0 else self.pad_token_id,
            "torch_dtype": "float32",
        }
