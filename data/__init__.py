"""Text -> token batches: sources (builtin, local C4 shards, the Hub's C4), tokenizers, packing,
sharded and resumable training batches, and the fixed validation slice. Never imports model/; of training/
only the leaf module of user-facing errors (common/errors.py).

`data.DataConfig` imports without torch; the pipeline loads on first use of any other name.
"""
from data.config import DataConfig
from common.errors import DataError

_LAZY = {"TrainBatches": "stream", "validation_batches": "stream", "Tokenizer": "tokenizer",
         "load_tokenizer": "tokenizer"}
__all__ = ["DataConfig", "DataError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
