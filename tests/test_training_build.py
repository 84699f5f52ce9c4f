"""training.build: `train.init_from` starts a run from given weights (a safetensors file or an exported
directory); a missing file or weights of another shape are one-line errors."""
import pytest
import torch
from safetensors.torch import save_file

from model import LlamaForCausalLM
from training.build import build_model
from training.config import load_config
from common.errors import CheckpointError

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "model.vocab_size=64"]


def config(*sets):
    return load_config("configs/llama_tiny.json", [*TINY, *sets])


def saved_weights(path, *sets):
    torch.manual_seed(7)
    model = LlamaForCausalLM(config(*sets).model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict()


@pytest.mark.parametrize("as_dir", [False, True])
def test_init_from_loads_the_weights_before_velora(tmp_path, as_dir):
    expected = saved_weights(tmp_path / "final" / "model.safetensors")
    where = tmp_path / "final" if as_dir else tmp_path / "final" / "model.safetensors"
    model, summary = build_model(config(f"train.init_from={where}", "velora.targets=paper"))
    assert summary.modules                      # VeLoRA applied on top of the loaded weights
    state = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_init_from_missing_file_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"train.init_from: .*nope.safetensors does not exist") as e:
        build_model(config(f"train.init_from={tmp_path / 'nope.safetensors'}"))
    assert "\n" not in str(e.value)


def test_init_from_other_shape_is_one_line(tmp_path):
    saved_weights(tmp_path / "w.safetensors", "model.hidden_size=64")
    with pytest.raises(CheckpointError, match=r"train.init_from: .*shape mismatch") as e:
        build_model(config(f"train.init_from={tmp_path / 'w.safetensors'}"))
    assert "\n" not in str(e.value)
