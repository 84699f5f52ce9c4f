"""apply_velora on our LLaMA and on transformers' LlamaForCausalLM: names, groups, exactness at M = 1."""
import copy
import dataclasses

import pytest
import torch

from model import LlamaConfig, LlamaForCausalLM
from velora import CompressedLinear, VeLoRAConfig, apply_velora, stored_bytes
from velora.config import TARGET_PRESETS

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)


def _ours(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def _loss(model, ids):
    out = model(ids, labels=ids)
    return out if isinstance(out, torch.Tensor) else out.loss


def _assert_exact_at_m1(plain):
    """With M = 1 (and r = 1) every sub-token is reconstructed exactly: gradients equal the plain model's."""
    model, summary = apply_velora(copy.deepcopy(plain), VeLoRAConfig(targets="all", sub_token_size=1))
    assert len(summary.modules) == 12 and not summary.warnings
    ids = torch.randint(0, 128, (2, 12))
    loss, ref = _loss(model, ids), _loss(plain, ids)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    for (n, p), (n_ref, p_ref) in zip(model.named_parameters(), plain.named_parameters()):
        assert n == n_ref
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_ours_exact_at_sub_token_size_one():
    _assert_exact_at_m1(_ours())


def test_transformers_llama_exact_at_sub_token_size_one():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    plain = transformers.LlamaForCausalLM(cfg)
    plain.config._attn_implementation = "sdpa"
    _assert_exact_at_m1(plain)


def test_parameter_names_groups_and_buffers():
    plain = _ours()
    model, summary = apply_velora(copy.deepcopy(plain), VeLoRAConfig(targets="all"))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, CompressedLinear)
    assert attn.q_proj.codec is attn.k_proj.codec is attn.v_proj.codec
    assert mlp.gate_proj.codec is mlp.up_proj.codec and mlp.down_proj.codec is not mlp.up_proj.codec
    assert (attn.q_proj.codec.sub_token_size, mlp.down_proj.codec.sub_token_size) == (1, 2)  # ceil(64/64), ceil(172/86)
    keys = [k for k in model.state_dict() if ".codec." in k and "layers.0." in k]
    assert keys == [f"model.layers.0.{k}.codec.{b}" for k in ("self_attn.q_proj",
                    "mlp.gate_proj", "mlp.down_proj") for b in ("v", "initialized")]
    assert "q_proj+k_proj+v_proj" in str(summary)


def test_group_shares_one_z_and_state_dict_round_trip():
    model, _ = apply_velora(_ours(), VeLoRAConfig(targets="all", sub_token_size=8))
    ids = torch.randint(0, 128, (2, 16))
    _loss(model, ids).backward()
    # 3 inputs per layer x 2 layers (o_proj is not in `all`), z of 8 (=64/8) or 22 (=ceil(172/8)) floats
    # per token, + v snapshots.
    assert stored_bytes(model) == 2 * 32 * 4 * (2 * 8 + 22) + 2 * 3 * 4 * 8
    fresh, _ = apply_velora(_ours(seed=1), VeLoRAConfig(targets="all", sub_token_size=8))
    fresh.load_state_dict(model.state_dict())
    for a, b in zip(model.modules(), fresh.modules()):
        if isinstance(a, CompressedLinear):
            assert torch.equal(a.codec.v, b.codec.v) and bool(b.codec.initialized)


def test_partial_group_and_missing_targets_warn():
    _, summary = apply_velora(_ours(), VeLoRAConfig(targets=["v_proj"]))
    assert len(summary.warnings) == 1 and "q_proj, k_proj read the same input" in summary.warnings[0]
    assert summary.freed_bytes_per_token() < 0 and "NO (partial group)" in str(summary)
    _, summary = apply_velora(torch.nn.Sequential(torch.nn.Linear(4, 4)), VeLoRAConfig(targets="all"))
    assert summary.modules == [] and "no nn.Linear named q_proj" in summary.warnings[0]


def test_activation_checkpointing_recompute_does_not_update_v_again():
    cfg = VeLoRAConfig(targets="all", sub_token_size=8, init="ema:0.5")
    ids = torch.randint(0, 128, (2, 16))
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY, activation_checkpointing=ckpt))
        model, _ = apply_velora(model, cfg)
        for _ in range(2):
            _loss(model, ids).backward()
        runs.append(model)
    for a, b in zip(runs[0].state_dict().items(), runs[1].state_dict().items()):
        torch.testing.assert_close(a[1], b[1], msg=a[0])
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_named_setting_fills_targets_and_codecs_and_refuses_contradictions():
    from velora.config import SETTINGS
    cfg = VeLoRAConfig(setting="sr2_hybrid")
    assert cfg.target_list == TARGET_PRESETS["all"] and cfg.codec_for("q_proj") == "sr2"
    assert cfg.codec_for("down_proj") == "velora" and SETTINGS["sr2_hybrid"]["codec"] == "sr2"
    assert VeLoRAConfig(**dataclasses.asdict(cfg)).codec_overrides == {"down_proj": "velora"}   # a saved config reloads
    assert VeLoRAConfig(setting="sr2_all").codec_for("down_proj") == "sr2"
    with pytest.raises(ValueError, match="velora.setting=sr2_hybrid sets velora.codec='sr2', but velora.codec='pca'"):
        VeLoRAConfig(setting="sr2_hybrid", codec="pca")
    with pytest.raises(ValueError, match="velora.setting: unknown setting 'best'"):
        VeLoRAConfig(setting="best")
