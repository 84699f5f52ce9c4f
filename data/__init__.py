"""Text -> token batches: sources (builtin, local C4 shards, the Hub's C4), tokenizers, packing,
sharded and resumable training batches, and the fixed validation slice. Never imports model/ or training/."""
from data.config import DataConfig, DataError
from data.stream import TrainBatches, validation_batches
from data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "DataError", "Tokenizer", "TrainBatches", "load_tokenizer", "validation_batches"]
