"""Saved-for-backward accounting: VeLoRA really frees projection inputs; partial groups free nothing."""
import json

import pytest
import torch

from model import LlamaConfig, LlamaForCausalLM
from velora import VeLoRAConfig, apply_velora
from velora.memory import measure_step
from training.commands.memory import main

L, D, F, B, T = 2, 64, 172, 2, 16
M = 8


def _saved(targets, dtype=None, **model_options):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                                         num_attention_heads=4, **model_options))
    model, summary = apply_velora(model, VeLoRAConfig(targets=targets, sub_token_size=M))
    ids = torch.randint(0, 128, (B, T))
    return measure_step(model, ids, dtype), summary


def test_all_frees_projection_inputs():
    none, _ = _saved("none")
    full, summary = _saved("all")
    n = B * T
    # Inputs only projections keep: the q/k/v input, the gate/up input (D each) and down's input (F).
    # (o_proj, not in `all`: its input is the attention output, which attention keeps for its own backward.)
    inputs = L * n * (D + D + F) * 4
    coefficients = L * (n * (2 * D // M + -(-F // M)) * 4 + 3 * M * 4)    # z + one v snapshot per input
    assert none["saved_total"] - full["saved_total"] >= inputs - coefficients
    assert full["saved"]["projection inputs"] == coefficients
    assert summary.stored_bytes_per_token() * n == coefficients - L * 3 * M * 4
    assert none["parameters"] == full["parameters"] == none["gradients"]
    assert none["optimizer_states"] == 2 * none["parameters"]


def test_v_proj_alone_warns_and_saves_nothing():
    none, _ = _saved("none")
    partial, summary = _saved(["v_proj"])
    assert any("saves nothing for that input" in w for w in summary.warnings)
    assert partial["saved_total"] >= none["saved_total"]


def test_bf16_autocast_drops_weight_copies_of_compressed_projections():
    none, _ = _saved("none", torch.bfloat16)
    full, _ = _saved("all", torch.bfloat16)
    # only lm_head's bf16 copy remains, and o_proj's (not in `all`)
    assert full["saved"]["weight copies"] == 128 * D * 2 + L * D * D * 2
    assert none["saved"]["weight copies"] > full["saved"]["weight copies"]


def test_memory_options_shrink_their_categories():
    base, _ = _saved("none")
    chunked, _ = _saved("none", loss_chunk_size=8)
    swiglu, _ = _saved("none", recompute_swiglu=True)
    logits = B * (T - 1) * 128 * 4               # the fp32 log-probabilities cross-entropy keeps
    assert base["saved"]["logits/loss"] - chunked["saved"]["logits/loss"] >= logits
    assert swiglu["saved"]["mlp activations"] == base["saved"]["mlp activations"] * 2 // 3


def test_cli_json_and_bad_config(capsys, tmp_path):
    assert main(["--config", "configs/llama_tiny.json", "--velora", "all", "--seq-len", "16",
                 "--recompute-swiglu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 16 and report["velora"] == "all" and report["saved"]["projection inputs"] > 0
    assert main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--velora", "some"], ["--dtype", "fp16"]])
def test_cli_rejects_bad_choices(argv):
    with pytest.raises(SystemExit):
        main(["--config", "configs/llama_tiny.json", *argv])
