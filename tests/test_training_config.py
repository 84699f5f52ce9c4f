"""Run-config errors: one line naming the key and the fix; batch-size resolution."""
import json

import pytest

from training.config import ConfigError, load_config, parse_override, resolve_batch

TINY = "configs/llama_tiny.json"


def write(tmp_path, raw):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(raw))
    return p


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_shipped_tiny_config_loads_and_overrides_apply():
    cfg = load_config(TINY, ["train.max_steps=7", "optim.lr=1e-3", "deepspeed.zero_optimization.stage=3",
                             "velora.targets=[v_proj,down_proj]"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert list(cfg.velora.targets) == ["v_proj", "down_proj"]


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"trian": {}}))
    assert "unknown section(s) trian" in one_line(e)


def test_unknown_key_names_section_key_and_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"train": {"max_step": 3}}))
    msg = one_line(e)
    assert "train.max_step" in msg and "cfg.json" in msg


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["train.max_steps=ten"])
    assert "train.max_steps: expected int, got 'ten'" in one_line(e)


def test_unknown_optimizer():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["optim.name=sgd"])
    assert "optim.name: expected one of adamw, adamw8bit, adafactor, galore_adamw, galore_adafactor, got 'sgd'" in one_line(e)


@pytest.mark.parametrize("text", ["max_steps=3", "train.max_steps", ".max_steps=3", "train..x=1"])
def test_bad_set_syntax(text):
    with pytest.raises(ConfigError) as e:
        parse_override(text)
    assert "section.key=value" in one_line(e)


def test_set_unknown_section():
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["trainer.max_steps=3"])
    assert "unknown section 'trainer'" in one_line(e)


def test_resolve_batch_derives_the_missing_value():
    assert resolve_batch({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, 2)[:3] == (16, 4, 2)
    assert resolve_batch({"train_batch_size": 16, "gradient_accumulation_steps": 2}, 2)[:3] == (16, 4, 2)
    g, m, a, note = resolve_batch({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2)
    assert (g, m, a) == (24, 4, 3) and "train_batch_size" in note


def test_resolve_batch_not_divisible():
    with pytest.raises(ConfigError) as e:
        resolve_batch({"train_batch_size": 15, "train_micro_batch_size_per_gpu": 4}, 1)
    assert "train_batch_size=15 is not divisible" in one_line(e)
