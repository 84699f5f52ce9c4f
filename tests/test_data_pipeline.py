"""Packing, sharding across ranks x workers, exact resume, epochs, GaLore mode and the validation slice.

The corpus is synthetic: document d is the words `d*1000 + j` (j < its length) and the tokenizer maps
a word to its number, so every token names its document and position.
"""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import EOS, NumTokenizer, cfg_for, make_corpus
from data import TrainBatches, validation_batches
from data.packing import IGNORE, pack_concat, pack_galore, predicted_tokens, processed_positions

def rows_of(batches):
    return [tuple(r) for x, _ in batches for r in x.tolist()]


def docs_in(rows_and_labels):
    """Split the real (unmasked) tokens of rows into documents at EOS."""
    docs, cur = [], []
    for x, y in rows_and_labels:
        for tok, lab in zip(x.tolist(), y.tolist()):
            if lab == IGNORE:
                continue
            if tok == EOS:
                docs.append(tuple(cur))
                cur = []
            else:
                cur.append(tok)
    assert cur == []
    return docs


def test_pack_concat_keeps_every_token_once_in_order():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    x, y = pack_concat(docs, 4, EOS, 0)
    assert x.shape == y.shape == (3, 4)
    stream = [5, 6, 7, EOS, 8, EOS, 9, 10, 11, 12, 13, EOS]
    assert x.reshape(-1).tolist() == stream
    assert (y == x).all()  # labels aligned with inputs: the model shifts
    x, y = pack_concat(docs, 5, EOS, 0)
    assert x.reshape(-1)[:12].tolist() == stream and x.reshape(-1)[12:].tolist() == [0] * 3
    assert (y.reshape(-1)[12:] == IGNORE).all() and (y.reshape(-1)[:12] == x.reshape(-1)[:12]).all()


def test_pack_galore_truncates_pads_and_masks():
    x, y = pack_galore([[5, 6, 7, 8, 9, 10], [11, 12]], 4, eos_id=1, pad_id=0)
    assert x.tolist() == [[5, 6, 7, 1], [11, 12, 1, 0]]  # T5: seq_len - 1 tokens + EOS, right-padded
    assert y.tolist() == [[5, 6, 7, 1], [11, 12, 1, IGNORE]]


def test_train_batches_concat_covers_each_document_once(tmp_path):
    train = make_corpus(tmp_path, [23, 31])
    tb = TrainBatches(cfg_for(tmp_path, epochs=1), NumTokenizer(), batch_size=4)
    batches = list(tb)
    assert all(x.shape == (4, 16) and x.dtype == y.dtype == torch.int64 for x, y in batches[:-1])
    rows = [(x[i], y[i]) for x, y in batches for i in range(len(x))]
    docs = docs_in(rows)
    assert sorted(docs) == sorted(train)
    assert tb.stats["docs"] == len(train) and tb.stats["epoch"] == 1
    assert tb.stats["tokens"] == sum(len(d) + 1 for d in train)


@pytest.mark.parametrize("shards", [[23, 31], [11, 12, 13, 14]])  # chunk-level and shard-level sharding
def test_two_ranks_two_workers_partition_the_single_process_stream(tmp_path, shards):
    make_corpus(tmp_path, shards)
    tok = NumTokenizer()
    single = rows_of(TrainBatches(cfg_for(tmp_path, epochs=1), tok, batch_size=1))
    parts = [rows_of(TrainBatches(cfg_for(tmp_path, epochs=1, num_workers=2), tok, 1, rank=r, world_size=2))
             for r in range(2)]
    # disjoint (a row holding only a document's final EOS and padding may repeat by content alone)
    informative = [Counter(r for r in p if len(set(r)) > 1) for p in parts]
    assert all(parts) and informative[0] & informative[1] == Counter()
    assert Counter(parts[0]) + Counter(parts[1]) == Counter(single)


@pytest.mark.parametrize("workers, cuda", [(0, False), (2, False), ("auto", True)])
def test_resume_continues_with_the_next_unseen_batch(tmp_path, workers, cuda):
    """In process, with workers, and with the workers a GPU run gets by default (pinning left out: no GPU here)."""
    make_corpus(tmp_path, [23, 31])
    cfg, tok = cfg_for(tmp_path, num_workers=workers, pin_memory=False), NumTokenizer()
    ref = TrainBatches(cfg, tok, batch_size=3, cuda=cuda)
    expected = [next(ref) for _ in range(40)]  # > 1 epoch of this corpus
    assert ref.stats["epoch"] >= 1 and ref.workers == cfg.loader(cuda)[0]
    first = TrainBatches(cfg, tok, batch_size=3, cuda=cuda)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TrainBatches(cfg, tok, batch_size=3, cuda=cuda)
    resumed.load_state_dict(state)
    for want in expected[7:]:
        got = next(resumed)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()
    assert resumed.stats == ref.stats


def test_resume_tokenizes_only_the_current_chunk(tmp_path):
    make_corpus(tmp_path, [23, 31, 17, 19])

    class Counting(NumTokenizer):
        docs = 0

        def encode_batch(self, texts):
            Counting.docs += len(texts)
            return super().encode_batch(texts)

    first = TrainBatches(cfg_for(tmp_path), Counting(), batch_size=3)
    for _ in range(40):
        next(first)
    assert first.state_dict()["positions"][0]["shard"] >= 2
    Counting.docs = 0
    resumed = TrainBatches(cfg_for(tmp_path), Counting(), batch_size=3)
    resumed.load_state_dict(first.state_dict())
    next(resumed)
    assert 0 < Counting.docs <= 5  # one chunk (shuffle_buffer=5), not the 60+ documents before it


def test_resume_refuses_a_different_setup(tmp_path):
    make_corpus(tmp_path, [23])
    tb = TrainBatches(cfg_for(tmp_path), NumTokenizer(), batch_size=3)
    next(tb)
    other = TrainBatches(cfg_for(tmp_path, seq_len=32), NumTokenizer(), batch_size=3)
    with pytest.raises(ValueError, match=r"data state: saved with seq_len=16 \(now 32\)"):
        other.load_state_dict(tb.state_dict())


def test_epochs_reshuffle_and_count(tmp_path):
    train = make_corpus(tmp_path, [23, 31])
    tb = TrainBatches(cfg_for(tmp_path, epochs=2), NumTokenizer(), batch_size=1)
    rows = [(x[0], y[0]) for x, y in tb]
    docs = docs_in(rows)
    half = len(docs) // 2
    assert sorted(docs[:half]) == sorted(docs[half:]) == sorted(train)
    assert docs[:half] != docs[half:]  # epoch 1 is shuffled differently
    assert tb.stats["epoch"] == 2


def test_galore_mode_one_document_per_row(tmp_path):
    train = make_corpus(tmp_path, [23])
    tb = TrainBatches(cfg_for(tmp_path, packing="galore", seq_len=8, epochs=1), NumTokenizer(), batch_size=2)
    rows = [(x[i], y[i]) for x, y in tb for i in range(len(x))]
    assert len(rows) == len(train)
    got = set()
    for x, y in rows:
        n = int((y != IGNORE).sum())
        assert x[n - 1] == EOS and (y[:n] == x[:n]).all() and (x[n:] == EOS).all()  # no pad id: EOS fills
        got.add(tuple(x[:n - 1].tolist()))
    assert got == {d[:7] for d in train}
    assert tb.stats["truncated_docs"] == sum(len(d) >= 8 for d in train)


def test_validation_slice_is_fixed_and_split_across_ranks(tmp_path):
    make_corpus(tmp_path, [23], val_docs=40)
    cfg, tok = cfg_for(tmp_path, val_tokens=100), NumTokenizer()
    a, b = validation_batches(cfg, tok, 2), validation_batches(cfg, tok, 2)
    assert rows_of(a) == rows_of(b)
    labels = np.concatenate([y.numpy() for _, y in a])
    assert 100 <= (labels != IGNORE).sum() < 100 + 16
    ranks = [rows_of(validation_batches(cfg, tok, 2, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(rows_of(a))
    assert not set(ranks[0]) & set(ranks[1])


def test_val_skip_tokens_gives_the_next_disjoint_slice(tmp_path):
    """data.val_skip_tokens=N starts the slice at the first row past N tokens: the rows of a slice twice as
    long, after the first slice's."""
    make_corpus(tmp_path, [23], val_docs=60)
    tok = NumTokenizer()
    first = rows_of(validation_batches(cfg_for(tmp_path, val_tokens=100), tok, 2))
    both = rows_of(validation_batches(cfg_for(tmp_path, val_tokens=200), tok, 2))
    second = rows_of(validation_batches(cfg_for(tmp_path, val_tokens=100, val_skip_tokens=100), tok, 2))
    assert not set(first) & set(second)
    assert both[:len(first)] == first and second[:len(both) - len(first)] == both[len(first):]
    from common.errors import ConfigError
    from data import DataError
    with pytest.raises(DataError, match="data.val_skip_tokens=100000 skips the whole validation split"):
        validation_batches(cfg_for(tmp_path, val_skip_tokens=100_000), tok, 2)
    with pytest.raises(ConfigError, match="data.val_skip_tokens: must be >= 0, got -1"):
        cfg_for(tmp_path, val_skip_tokens=-1)


def test_the_whole_file_split_reads_every_document_of_one_file(tmp_path):
    """split="all": every document of a file held out from training altogether (no 1-in-10 split by hash)."""
    from conftest import doc_tokens, write_shard
    docs = [{"text": " ".join(map(str, doc_tokens(d, 5)))} for d in range(30)]
    write_shard(tmp_path / "heldout.json.gz", docs)
    cfg = cfg_for(tmp_path / "heldout.json.gz", val_tokens=10 ** 6)
    rows = [(x, y) for xb, yb in validation_batches(cfg, NumTokenizer(), 4, split="all") for x, y in zip(xb, yb)]
    assert len(docs_in(rows)) == 30
    from data import DataError
    with pytest.raises(DataError, match="whole-file split needs data.source=local and data.path a file"):
        validation_batches(cfg_for(tmp_path), NumTokenizer(), 4, split="all")


def test_validation_smaller_than_val_tokens_uses_all_and_warns(tmp_path, caplog):
    make_corpus(tmp_path, [23], val_docs=3)
    batches = validation_batches(cfg_for(tmp_path, val_tokens=10**6), NumTokenizer(), 4)
    assert batches and "fewer than data.val_tokens" in caplog.text


def test_processed_positions_leave_out_only_the_padding_at_the_end_of_rows():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    inputs, labels = pack_concat(docs, 4, eos_id=1, pad_id=0)
    assert processed_positions(labels) == 3 + 1 + 5 + 3 and predicted_tokens(labels) == 12 - len(inputs)
    inputs, labels = pack_galore(docs, 4, eos_id=1, pad_id=0)
    assert processed_positions(labels) == 4 + 2 + 4
    assert processed_positions(torch.full((2, 4), IGNORE)) == 0
