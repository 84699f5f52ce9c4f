"""docs/ERRORS.md is the catalogue of bad inputs: every row names a test that exists, and the rows no
other test covers are proved here. The `test_cli_*` tests run the real train_c4.py: exit code 2,
exactly one `error:` line on stderr, no traceback (unless --debug), no output directory left behind.
"""
import importlib
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, assert_one_line_error, env, good, lines_shard, read_all
from data import DataError
from training.config import ConfigError, load_config, resolve_batch

CATALOGUE = REPO / "docs" / "ERRORS.md"
CONFIG = "configs/llama_tiny.json"
TEST_ID = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")


def catalogue_rows() -> list[list[str]]:
    """The table rows of docs/ERRORS.md (header and separator rows left out), as lists of cells."""
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 3 and cells[0] != "case" and not set(cells[0]) <= set("-"):
            rows.append(cells)
    return rows


def test_every_row_names_tests_that_exist():
    rows = catalogue_rows()
    assert len(rows) >= 20
    for case, message, tests in rows:
        ids = TEST_ID.findall(tests)
        assert case and message and ids, (case, tests)
        for path, name in ids:
            module = importlib.import_module(path.removeprefix("tests/").removesuffix(".py"))
            assert callable(getattr(module, name, None)), f"docs/ERRORS.md row {case!r}: {path}::{name} does not exist"


def cli(out, *sets, args=()):
    cmd = [sys.executable, "train_c4.py", "--config", CONFIG,
           *[a for s in [*TINY, f"train.output_dir={out}", *sets] for a in ("--set", s)], *args]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


# --- configs ---

def test_cli_config_file_missing(tmp_path):
    p = subprocess.run([sys.executable, "train_c4.py", "--config", str(tmp_path / "nope.json")], cwd=REPO,
                       env=env(), capture_output=True, text=True, timeout=600)
    assert_one_line_error(p, f"{tmp_path / 'nope.json'}: config file not found")
    p = subprocess.run([sys.executable, "train_c4.py", "--config", str(tmp_path / "nope.json"), "--debug"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError" in p.stderr


def test_config_not_json(tmp_path):
    (tmp_path / "cfg.json").write_text('{"train": {"max_steps": 3,}}')
    with pytest.raises(ConfigError, match=r"cfg.json: not valid JSON \(line 1, column 27: Expecting "):
        load_config(tmp_path / "cfg.json")


def test_cli_wrong_type_through_set(tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(cli(out, "train.max_steps=ten"), "train.max_steps: expected int, got 'ten'")
    assert not out.exists()


def test_value_out_of_range():
    with pytest.raises(ConfigError, match=r"llama_tiny.json: train.save_every: must be positive, got 0$"):
        load_config(CONFIG, ["train.save_every=0"])


def test_inconsistent_batch_triple():
    with pytest.raises(ConfigError, match=r"^deepspeed: train_batch_size=16 != train_micro_batch_size_per_gpu=4 x "
                                          r"gradient_accumulation_steps=2 x world size 1; drop one to derive it$"):
        resolve_batch({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4,
                       "gradient_accumulation_steps": 2}, 1)


def test_velora_sub_token_size_not_positive():
    with pytest.raises(ConfigError, match=r"velora.sub_token_size: must be positive \(or 0 for the paper's "
                                          r"grouping\), got -4$"):
        load_config(CONFIG, ["velora.targets=all", "velora.sub_token_size=-4"])


def test_velora_targets_that_do_not_exist():
    with pytest.raises(ConfigError, match=r"velora.targets: unknown projection\(s\) qkv_proj; known: q_proj, "):
        load_config(CONFIG, ["velora.targets=[v_proj,qkv_proj]"])
    with pytest.raises(ConfigError, match=r"velora.targets: unknown preset 'everything'; use one of "):
        load_config(CONFIG, ["velora.targets=everything"])


def test_velora_init_unknown():
    with pytest.raises(ConfigError, match=r"velora.init: expected batch_average_once, .* got 'ema:2'$"):
        load_config(CONFIG, ["velora.init=ema:2"])


def test_cli_seq_len_exceeds_max_sequence_length(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.seq_len=128 exceeds model.max_sequence_length=64; "):
        load_config(CONFIG, [*TINY, "data.seq_len=128"])
    out = tmp_path / "run"
    assert_one_line_error(cli(out, "data.seq_len=128"), "data.seq_len=128 exceeds model.max_sequence_length=64")
    assert not out.exists()


# --- data ---

@pytest.mark.parametrize("bad, counter", [(b'{"url": "no text"}', "missing_text"),
                                          (b'{"text": "\xff\xfe 12"}', "bad_utf8")])
def test_malformed_lines_over_the_threshold(tmp_path, bad, counter):
    lines_shard(tmp_path / "c4-train.00000-of-00001.json.gz", good(20) + [bad] * 3)
    with pytest.raises(DataError, match=rf"^c4-train.00000-of-00001.json.gz: 3 of 23 lines are malformed "
                                        rf"\(3 {counter}\), more than data.max_bad_fraction=0.01; fix or remove "
                                        rf"the file, or raise data.max_bad_fraction$"):
        read_all(tmp_path)


def test_cli_data_path_missing(tmp_path):
    out = tmp_path / "run"
    p = cli(out, "data.source=local", f"data.path={tmp_path / 'nowhere'}", "data.tokenizer=builtin")
    assert_one_line_error(p, f"data.path: {tmp_path / 'nowhere'} does not exist; point it at a directory of C4 "
                             f"shards")
    assert not out.exists()


def test_cli_tokenizer_vocab_mismatch(tmp_path):
    from ckpt_helpers import VOCAB, write_tokenizer
    tok = write_tokenizer(tmp_path / "sp.model")
    out = tmp_path / "run"
    p = cli(out, f"data.tokenizer={tok}", "model.vocab_size=64")
    assert_one_line_error(p, f"data.tokenizer: {tok} has {VOCAB - 28} tokens but model.vocab_size is 64; "
                             f"raise model.vocab_size or use a smaller tokenizer")
    assert not out.exists()


# --- checkpoints ---

def test_cli_resume_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    out = tmp_path / "run"
    p = cli(out, args=["--resume", str(tmp_path / "junk")])
    assert_one_line_error(p, f"--resume {tmp_path / 'junk'}: {tmp_path / 'junk'} is not a usable checkpoint "
                             f"(missing run_config.json, trainer_state_rank0.json, *model_states.pt); pass a "
                             f"checkpoints/step_N directory or --resume auto")
    assert not out.exists()


@pytest.mark.parametrize("sets, message", [
    (["optim.lr=NaN"], "optim.lr: must be positive, got nan"),
    (["optim.lr=-0.1"], "optim.lr: must be positive, got -0.1"),
    (["optim.betas=[0.9,1.0]"], "optim.betas: expected two numbers in [0, 1), got [0.9, 1.0]"),
    (["optim.eps=-1"], "optim.eps: must be >= 0, got -1.0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0, got -0.1"),
    (["train.seed=-1"], "train.seed: must be >= 0, got -1"),
    (["data.seed=-3"], "data.seed: must be >= 0, got -3"),
    (["train.eval_batch_size=-1"], "train.eval_batch_size: must be >= 0 (0: the micro-batch size), got -1"),
    (["optim.galore_rank=0"], "optim.galore_rank: must be positive, got 0"),
    (["optim.galore_update_proj_gap=0"], "optim.galore_update_proj_gap: must be positive, got 0"),
    (["optim.galore_proj_type=bogus"], "optim.galore_proj_type: expected one of std, reverse_std, right, left, full"),
    (["model.initializer_range=0"], "model.initializer_range: must be positive, got 0"),
    (["model.rope_theta=0"], "model.rope_theta: must be positive, got 0"),
    (["model.rms_norm_eps=-1e-6"], "model.rms_norm_eps: must be >= 0, got -1e-06"),
    (["velora.targets=all", "velora.rank=5"], "velora.rank=5 exceeds the sub-token size M=4 of q_proj (width 256)"),
])
def test_out_of_range_values(sets, message):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, sets)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cache_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="data.cache_dir: .* is a file, not a directory"):
        load_config(CONFIG, [f"data.cache_dir={tmp_path / 'f'}"])


def test_duplicate_keys_and_encoding(tmp_path):
    (tmp_path / "dup.json").write_text('{"train": {"max_steps": 3, "max_steps": 4}}')
    with pytest.raises(ConfigError, match=r"dup.json: key 'max_steps' appears twice in one object; keep one$"):
        load_config(tmp_path / "dup.json")
    with pytest.raises(ConfigError, match=r"key 'a' appears twice"):
        load_config(CONFIG, ['deepspeed.x={"a": 1, "a": 2}'])
    (tmp_path / "latin1.json").write_bytes('{"train": {"output_dir": "r\xe9sum\xe9"}}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.json: not UTF-8 text \(byte 27\); save the config as UTF-8 JSON$"):
        load_config(tmp_path / "latin1.json")


def test_builtin_tokenizer_advice():
    from data import load_tokenizer
    with pytest.raises(DataError, match=r"cannot train a 100-token BPE model .*; raise model.vocab_size or set"):
        load_tokenizer(load_config(CONFIG).data, 100)


def test_builtin_tokenizer_on_a_full_disk_names_the_cache_and_leaves_nothing(monkeypatch):
    import sentencepiece as spm

    from data import load_tokenizer

    def full_disk(**kwargs):
        raise RuntimeError("Internal: src/trainer_interface.cc(662) No space left on device")
    from data.builtin import builtin_corpus_dir
    data_cfg = load_config(CONFIG).data
    cache = data_cfg.cache_path
    builtin_corpus_dir(cache)                                # the corpus exists; only the tokenizer fails
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", full_disk)
    before = sorted(p.name for p in cache.iterdir())
    with pytest.raises(DataError, match=r"\(Internal: .*No space left on device\); check the space and permissions of "):
        load_tokenizer(data_cfg, 1234)                     # a size no test caches
    assert sorted(p.name for p in cache.iterdir()) == before
