"""The model against independent references: transformers' LLaMA, GaLore's parameter counts, causality."""
import json

import pytest
import torch

from model import LlamaConfig, LlamaForCausalLM

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
             num_attention_heads=4, max_sequence_length=64)


@pytest.mark.parametrize("name,expected_millions", [
    ("llama_60m", 58.07), ("llama_130m", 134.11), ("llama_350m", 367.97), ("llama_1b", 1339.08)])
def test_parameter_counts_match_galore(name, expected_millions):
    cfg = LlamaConfig.from_dict(json.load(open(f"configs/{name}.json"))["model"])
    with torch.device("meta"):  # no 1B allocation
        n = LlamaForCausalLM(cfg).num_parameters()
    assert abs(n / 1e6 - expected_millions) / expected_millions < 1e-3


def _hf_twin(cfg: LlamaConfig, ours: LlamaForCausalLM):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def test_logits_and_loss_match_transformers():
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL)
    ours = LlamaForCausalLM(cfg).eval()
    hf = _hf_twin(cfg, ours)
    ids = torch.randint(0, cfg.vocab_size, (3, 37))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids, labels=labels), hf(ids, labels=labels).loss, atol=1e-6, rtol=0)


def test_gradients_match_transformers():
    torch.manual_seed(1)
    cfg = LlamaConfig(**SMALL)
    ours = LlamaForCausalLM(cfg)
    hf = _hf_twin(cfg, ours).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ours(ids, labels=ids).backward()
    hf(ids, labels=ids).loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_causal():
    torch.manual_seed(2)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    ids = torch.randint(0, 101, (1, 20))
    changed = ids.clone()
    changed[0, 12] = (ids[0, 12] + 1) % 101
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("option", [{"loss_chunk_size": 7}, {"recompute_swiglu": True},
                                    {"activation_checkpointing": True}])
def test_memory_options_change_nothing_but_memory(option):
    torch.manual_seed(3)
    ids = torch.randint(0, 101, (2, 24))
    labels = ids.clone()
    labels[1, 3:9] = -100
    plain = LlamaForCausalLM(LlamaConfig(**SMALL))
    other = LlamaForCausalLM(LlamaConfig(**SMALL, **option))
    other.load_state_dict(plain.state_dict())
    losses = [m(ids, labels=labels) for m in (plain, other)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_hf_parameter_names():
    names = set(LlamaForCausalLM(LlamaConfig(**SMALL)).state_dict())
    for expected in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                     "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]:
        assert expected in names
    assert not any("rotary" in n for n in names)


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    with pytest.raises(ValueError, match="model: unknown key\\(s\\) hiden_size"):
        LlamaConfig.from_dict({"hiden_size": 3})
    with pytest.raises(ValueError, match="model.hidden_size: expected int, got '512'"):
        LlamaConfig.from_dict({"hidden_size": "512"})
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        LlamaConfig(hidden_size=100, num_attention_heads=3)
    # GaLore's own JSON (with its informational keys) loads as is.
    galore = {"architectures": ["LLaMAForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              "hidden_size": 512, "intermediate_size": 1376, "initializer_range": 0.02,
              "max_sequence_length": 1024, "model_type": "llama", "num_attention_heads": 8,
              "num_hidden_layers": 8, "pad_token_id": -1, "rms_norm_eps": 1e-06,
              "transformers_version": "4.28.1", "use_cache": True, "vocab_size": 32000}
    path = tmp_path / "llama_60m.json"
    path.write_text(json.dumps(galore))
    assert LlamaConfig.from_json(path).intermediate_size == 1376
