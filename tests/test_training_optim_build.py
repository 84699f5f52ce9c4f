"""Optimizer construction: GaLore's parameter groups, and combinations refused up front."""
import pytest
import torch

from model import LlamaConfig, LlamaForCausalLM
from training.config import ConfigError, load_config
from training.optim.build import build_optimizer, galore_param_groups
from training.optim.zero_adafactor import ZeroAdafactor
from training.optim.zero_galore import ZeroGaLore

TINY = "configs/llama_tiny.json"
SMALL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
         "model.vocab_size=64", "model.num_attention_heads=2"]


def small_model():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2))


def test_galore_groups_project_attention_and_mlp_matrices_only():
    model = small_model()
    cfg = load_config(TINY, SMALL + ["optim.name=galore_adamw", "optim.galore_rank=4"])
    plain, projected = galore_param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    proj_names = sorted(names[id(p)] for p in projected["params"])
    assert len(proj_names) == 2 * 7 and all(".self_attn." in n or ".mlp." in n for n in proj_names)
    assert all(p.dim() == 2 for p in projected["params"])
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= {names[id(p)] for p in plain["params"]}
    assert (projected["rank"], projected["update_proj_gap"], projected["scale"], projected["proj_type"]) == \
        (4, cfg.optim.galore_update_proj_gap, cfg.optim.galore_scale, "std")
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_galore_optimizers_step(name):
    model = small_model()
    cfg = load_config(TINY, SMALL + [f"optim.name={name}", "optim.galore_rank=4"])
    opt, _, notes = build_optimizer(model, cfg)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).backward()
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    assert "projected matrices" in notes[0]


def test_galore_targets_matching_nothing():
    cfg = load_config(TINY, SMALL + ["optim.name=galore_adamw", "optim.galore_targets=[ffn]"])
    with pytest.raises(ConfigError, match="optim.galore_targets"):
        galore_param_groups(small_model(), cfg.optim)


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_galore_under_zero_is_wrapped(name, stage):
    cfg = load_config(TINY, SMALL + [f"optim.name={name}", f"deepspeed.zero_optimization.stage={stage}"])
    opt, ds, _ = build_optimizer(small_model(), cfg)
    assert isinstance(opt, ZeroGaLore) and ds["zero_allow_untested_optimizer"] is True


def test_elastic_checkpoint_is_refused_for_the_zero_partition_optimizers():
    with pytest.raises(ConfigError, match="elastic_checkpoint=true would save none of adafactor's state under ZeRO 2"):
        load_config(TINY, ["optim.name=adafactor", "deepspeed.zero_optimization.stage=2",
                           "deepspeed.zero_optimization.elastic_checkpoint=true"])


def test_deepspeed_optimizer_only_with_adamw_and_no_deepspeed_scheduler():
    with pytest.raises(ConfigError, match="remove deepspeed.optimizer or use optim.name=adamw"):
        load_config(TINY, ["optim.name=adafactor", 'deepspeed.optimizer={"type": "AdamW"}'])
    with pytest.raises(ConfigError, match="remove deepspeed.scheduler"):
        load_config(TINY, ['deepspeed.scheduler={"type": "WarmupLR"}'])


def test_adamw_and_deepspeed_built_optimizer():
    cfg = load_config(TINY, SMALL + ["optim.lr=0.002", "optim.weight_decay=0.1"])
    opt, ds, _ = build_optimizer(small_model(), cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.002 and opt.defaults["weight_decay"] == 0.1
    assert ds == cfg.deepspeed and ds is not cfg.deepspeed
    cfg = load_config(TINY, SMALL + ['deepspeed.optimizer={"type": "AdamW", "params": {"lr": 1e-3}}'])
    opt, _, notes = build_optimizer(small_model(), cfg)
    assert opt is None and "DeepSpeed's AdamW" in notes[0]


@pytest.mark.parametrize("stage, cls, note", [(0, torch.optim.Adafactor, None),
                                              (2, ZeroAdafactor, "second moments factored across the ZeRO 2"),
                                              (3, ZeroAdafactor, "second moments factored across the ZeRO 3")])
def test_adafactor_per_zero_stage(stage, cls, note):
    cfg = load_config(TINY, SMALL + ["optim.name=adafactor", f"deepspeed.zero_optimization.stage={stage}"])
    opt, ds, notes = build_optimizer(small_model(), cfg)
    assert type(opt) is cls and (note in notes[0] if note else not notes)
    assert ds.get("zero_allow_untested_optimizer") is (True if stage else None)
    assert "zero_allow_untested_optimizer" not in cfg.deepspeed


def test_matrix_lr_scale_splits_the_lr_like_galore_without_projecting():
    """adamw with optim.matrix_lr_scale: attention/MLP matrices at scale x lr, everything else at lr; the
    schedule scales both groups alike; galore_* refuses it (they scale with galore_scale)."""
    from model import LlamaForCausalLM
    from training.optim import build_optimizer
    from training.optim.schedule import build_scheduler

    cfg = load_config(TINY, ["optim.matrix_lr_scale=0.25", "optim.lr=0.01"])
    model = LlamaForCausalLM(cfg.model)
    opt, _, notes = build_optimizer(model, cfg)
    plain, matrices = opt.param_groups
    assert plain["lr"] == 0.01 and matrices["lr"] == 0.0025 and "0.25 x lr" in notes[0]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("self_attn" in names[id(p)] or "mlp" in names[id(p)]) for p in matrices["params"])
    assert any("embed_tokens" in names[id(p)] for p in plain["params"])
    sched = build_scheduler(opt, cfg.optim, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.25 * opt.param_groups[0]["lr"])
    with pytest.raises(ConfigError, match="optim.matrix_lr_scale=0.5 applies to adamw and adafactor"):
        load_config(TINY, ["optim.name=galore_adamw", "optim.matrix_lr_scale=0.5"])
