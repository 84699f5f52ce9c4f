"""The Hugging Face side of an export: the files `transformers` and lm-evaluation-harness read besides the
weights, so that `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(final)` work with no conversion
step and tokenize exactly as training did.

- `tokenizer.json` + `tokenizer_config.json`: the run's sentencepiece model converted by transformers
  (byte fallback, the same pieces; texts that begin with several spaces may split differently). BOS is
  added exactly when training added it (data.add_bos; transformers 5 keeps this in tokenizer.json's
  post-processor, not as `add_bos_token`), never EOS (training appends EOS after each document, which a
  prompt must not get); EOS is the pad token (the sentencepiece models have none) and
  `model_max_length` is the model's.
- `config.json`: transformers' LlamaConfig, with the tokenizer's BOS/EOS ids and EOS as pad.
- `generation_config.json`: the same ids, so `generate` stops at EOS and pads batched prompts.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..state import HF_CONFIG, TOKENIZER

GENERATION_CONFIG = "generation_config.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def special_ids(tokenizer_file: Path) -> dict:
    """BOS / EOS / pad ids of a sentencepiece model, pad = EOS (None where the model has no such token)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    ids = {k: (i if i >= 0 else None) for k, i in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()))}
    return {**ids, "pad_token_id": ids["eos_token_id"]}


def write_hf_files(out: Path, model_cfg, tokenizer_file: Path, add_bos: bool, dtype: str) -> None:
    """Write config.json, generation_config.json and the transformers tokenizer files into `out`."""
    from transformers import LlamaTokenizer   # the fast (tokenizers) LLaMA tokenizer in transformers >= 5

    ids = special_ids(tokenizer_file)
    hf = {**model_cfg.to_hf_dict(), "torch_dtype": dtype, **ids}
    (out / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
    generation = {**ids, "max_length": model_cfg.max_sequence_length, "_from_model_config": False}
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
    with tempfile.TemporaryDirectory() as tmp:      # transformers converts a directory's tokenizer.model
        shutil.copyfile(tokenizer_file, Path(tmp) / TOKENIZER)
        tok = LlamaTokenizer.from_pretrained(tmp, add_bos_token=add_bos, add_eos_token=False,
                                             model_max_length=model_cfg.max_sequence_length)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    # save_pretrained may write the sentencepiece file again: the run's own copy stays authoritative
    shutil.copyfile(tokenizer_file, out / TOKENIZER)
