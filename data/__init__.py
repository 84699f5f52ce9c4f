"""Text -> token batches: sources (builtin, local C4 shards, the Hub's C4), tokenizers, packing,
sharded and resumable training batches, and the fixed validation slice. Never imports model/; of training/
only the leaf module of user-facing errors (training/errors.py)."""
from data.config import DataConfig
from training.errors import DataError
from data.stream import TrainBatches, validation_batches
from data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "DataError", "Tokenizer", "TrainBatches", "load_tokenizer", "validation_batches"]
