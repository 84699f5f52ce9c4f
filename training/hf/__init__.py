"""Hugging Face export and load: `save_final` writes a plain LLaMA that `transformers` loads as is (with
the tokenizer and config files of `files`), and `load_model` reads one back, or the weights of a DeepSpeed
checkpoint, on CPU."""
from .export import check_export_target, export_lock, is_export, plain_state_dict, save_final
from .files import write_hf_files
from .load import CheckpointSource, load_model, load_source, read_safetensors, resolve_checkpoint

__all__ = ["CheckpointSource", "check_export_target", "export_lock", "is_export", "load_model", "load_source",
           "plain_state_dict", "read_safetensors", "resolve_checkpoint", "save_final", "write_hf_files"]
