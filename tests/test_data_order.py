"""`data.doc_order` (a fixed document order replayed batch after batch, and the validation documents in
their order) and `data.pad_id`. Document d of the synthetic corpus is the words d*1000 + j, so every row
names its document."""
import json

import pytest

from conftest import NumTokenizer, cfg_for, make_corpus
from common.errors import ConfigError
from data import DataError, TrainBatches, validation_batches


def first_doc(row) -> int:
    return int(row[0]) // 1000


def order_file(tmp_path, **orders):
    path = tmp_path / "order.json"
    path.write_text(json.dumps(orders))
    return str(path)


def test_train_order_replays_lines_across_shards_then_ends(tmp_path):
    make_corpus(tmp_path, [6, 5])                        # lines 0-5 in shard 0, 6-10 in shard 1
    order = [7, 0, 0, 10, 3, 6, 2]                       # repeats and crosses shards, as the reference does
    cfg = cfg_for(tmp_path, packing="galore", doc_order=order_file(tmp_path, train_order=order))
    batches = list(TrainBatches(cfg, NumTokenizer(), batch_size=3))
    assert [[first_doc(r) for r in x.tolist()] for x, _ in batches] == [[7, 0, 0], [10, 3, 6], [2]]


def test_train_order_is_split_across_ranks_and_resumes(tmp_path):
    make_corpus(tmp_path, [12])
    cfg = cfg_for(tmp_path, packing="galore", doc_order=order_file(tmp_path, train_order=list(range(11, -1, -1))))
    ranks = [[first_doc(r) for x, _ in TrainBatches(cfg, NumTokenizer(), 2, rank, 2) for r in x.tolist()]
             for rank in (0, 1)]
    assert ranks == [[11, 10, 7, 6, 3, 2], [9, 8, 5, 4, 1, 0]]
    tb = TrainBatches(cfg, NumTokenizer(), batch_size=4)
    next(tb)
    resumed = TrainBatches(cfg, NumTokenizer(), batch_size=4)
    resumed.load_state_dict(tb.state_dict())
    assert [first_doc(r) for r in next(resumed)[0].tolist()] == [7, 6, 5, 4]


def test_val_order_sets_the_validation_documents(tmp_path):
    make_corpus(tmp_path, [4], val_docs=5)               # validation documents are 4-8
    cfg = cfg_for(tmp_path, packing="galore", val_tokens=10**6,
                  doc_order=order_file(tmp_path, train_order=[0], val_order=[3, 1, 1]))
    batches = validation_batches(cfg, NumTokenizer(), batch_size=2)
    assert [[first_doc(r) for r in x.tolist()] for x, _ in batches] == [[7, 5], [5]]


def test_pad_id_fills_rows(tmp_path):
    make_corpus(tmp_path, [3])
    x, y = next(iter(TrainBatches(cfg_for(tmp_path, packing="galore", seq_len=64, pad_id=0), NumTokenizer(), 3)))
    assert ((x == 0) == (y == -100)).all() and (x == 0).any()


@pytest.mark.parametrize("orders, fragment", [
    (None, "cannot be read"),
    ({"val_order": [0]}, "needs 'train_order'"),
    ({"train_order": [0, 99]}, "line 99 is beyond the 4 lines of the train split"),
])
def test_bad_order_files_are_one_line_errors(tmp_path, orders, fragment):
    make_corpus(tmp_path, [4])
    path = str(tmp_path / "missing.json") if orders is None else order_file(tmp_path, **orders)
    with pytest.raises(DataError, match=fragment) as e:
        next(TrainBatches(cfg_for(tmp_path, packing="galore", doc_order=path), NumTokenizer(), 2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, fragment", [({"packing": "concat"}, "needs data.packing=galore"),
                                          ({"packing": "galore", "num_workers": 2}, "data.num_workers=0"),
                                          ({"packing": "galore", "pad_id": -2}, "data.pad_id")])
def test_bad_settings_are_refused(tmp_path, kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        cfg_for(tmp_path, doc_order="order.json", **kw)
