"""Tokenizers: a sentencepiece .model file, GaLore's `t5-base`, or the built-in BPE model.

The built-in model is sentencepiece BPE with byte fallback (no unknown characters), trained once on
the built-in corpus' train split with the model's vocabulary size and cached under the cache
directory as `tokenizer-builtin-wiki-v1-bpe-<vocab>.model`; ids unk/bos/eos = 0/1/2, no pad id.
Normalisation is the identity (text round-trips exactly), digits are split.
`encode` never adds BOS/EOS: packing adds EOS (see data/packing.py).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import sentencepiece as spm

from data.builtin import CORPUS_DIR, builtin_corpus_dir, cache_lock
from data.config import DataConfig
from common.errors import DataError
from data.sources import hub_offline_reason, parse_record, split_shards

T5_REPO = "google-t5/t5-base"
MAX_TRAIN_DOCS = 20000              # cap on documents fed to the BPE trainer (the corpus has ~9k)


class Tokenizer:
    """Text -> ids. `model_path` is the sentencepiece file to copy next to checkpoints."""

    def __init__(self, model_path: str | Path, name: str = "", hf_name: str = ""):
        self.model_path = str(model_path)
        self.name = name or self.model_path
        self.hf_name = hf_name      # encode with this transformers tokenizer (t5-base), for exactness
        self._load()

    def _load(self):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer: {self.model_path} is not a sentencepiece .model file "
                            f"({str(e).splitlines()[0]}); point it at one, or use builtin") from None
        self.hf = None
        if self.hf_name:
            from transformers import AutoTokenizer
            try:
                self.hf = AutoTokenizer.from_pretrained(self.hf_name)
            except Exception as e:  # offline without a cached copy, or the Hub unreachable
                raise DataError(f"data.tokenizer={self.name}: cannot load {self.hf_name} ({type(e).__name__}); "
                                f"set data.tokenizer to a sentencepiece .model path or to builtin") from None
        self.vocab_size = self.sp.get_piece_size()
        ids = (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        if self.eos_id is None:
            raise DataError(f"data.tokenizer: {self.model_path} has no EOS token; packing needs one to "
                            f"separate documents")

    def __getstate__(self):  # DataLoader workers started with spawn re-load the files
        return {"model_path": self.model_path, "name": self.name, "hf_name": self.hf_name}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (sentencepiece encodes the batch in C++)."""
        if self.hf is not None:  # text like "<extra_id_0>" stays text: ids stay below the 32000 of GaLore's models
            return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self.sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def __repr__(self):
        return f"Tokenizer({self.name}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _train_builtin(cache: Path, vocab_size: int) -> Path:
    final = cache / f"tokenizer-{CORPUS_DIR}-bpe-{vocab_size}.model"
    if final.is_file():
        return final
    builtin_corpus_dir(cache)  # takes the lock itself
    with cache_lock(cache):
        if final.is_file():
            return final
        cfg = DataConfig(source="builtin", cache_dir=str(cache))
        stats = Counter()
        docs = (t for shard in split_shards(cfg, "train") for r in shard.records()
                if (t := parse_record(r, stats)) is not None)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            prefix = os.path.join(tmp, "sp")
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=docs, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                    byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                    character_coverage=0.9995, input_sentence_size=MAX_TRAIN_DOCS, shuffle_input_sentence=True,
                    max_sentence_length=1 << 16, split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                    num_threads=2, minloglevel=2)  # fixed: the thread count is recorded in the file
            except RuntimeError as e:
                why = str(e).splitlines()[0]
                # sentencepiece: "Vocabulary size is smaller than required_chars. N vs M." or "... too high";
                # anything else (a full disk, an unwritable cache) is not about the vocabulary
                fix = ("raise model.vocab_size" if "smaller than" in why else "lower model.vocab_size"
                       if "ocabulary size" in why else f"check the space and permissions of {cache}")
                raise DataError(f"data.tokenizer=builtin: cannot train a {vocab_size}-token BPE model on the "
                                f"built-in corpus ({why}); {fix} or set data.tokenizer to a sentencepiece "
                                f".model (nothing was left in the cache)") from None
            os.replace(prefix + ".model", final)
    return final


def _t5_model_file() -> str:
    reason = hub_offline_reason()
    from huggingface_hub import hf_hub_download
    try:  # a cached copy works offline
        return hf_hub_download(T5_REPO, "spiece.model", local_files_only=bool(reason))
    except Exception as e:
        why = reason or f"{type(e).__name__}"
        raise DataError(f"data.tokenizer=t5-base: cannot fetch it from the Hub ({why}); set data.tokenizer "
                        f"to a sentencepiece .model path or to builtin") from None


def load_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names, checked to fit a model with `vocab_size` embeddings."""
    if cfg.tokenizer == "builtin":
        tok = Tokenizer(_train_builtin(cfg.cache_path, vocab_size), name=f"builtin-bpe-{vocab_size}")
    elif cfg.tokenizer == "t5-base":
        tok = Tokenizer(_t5_model_file(), name="t5-base", hf_name=T5_REPO)
    else:
        path = Path(cfg.tokenizer)
        if not path.is_file():
            raise DataError(f"data.tokenizer: {path} does not exist; use builtin, t5-base, or a sentencepiece "
                            f".model path")
        tok = Tokenizer(path)
    if cfg.bos and tok.bos_id is None:
        raise DataError(f"data.add_bos: {tok.name} has no BOS token to start documents with; set data.add_bos=false")
    if cfg.pad_id >= tok.vocab_size:
        raise DataError(f"data.pad_id={cfg.pad_id} is not a token of {tok.name} ({tok.vocab_size} tokens); use a "
                        f"smaller id, or -1 for the tokenizer's own")
    if tok.vocab_size > vocab_size:
        raise DataError(f"data.tokenizer: {tok.name} has {tok.vocab_size} tokens but model.vocab_size is "
                        f"{vocab_size}; raise model.vocab_size or use a smaller tokenizer")
    return tok
