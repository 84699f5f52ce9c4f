"""The memory planner (training/plan): its fake-tensor step equals the same step on real CPU tensors, part by
part, for every method, codec and memory option at two micro-batches; its parts agree with independent counts
(exact optimizer state as scripts/bench_optim_state.py counts it, velora.memory's saved bytes); ZeRO's
formulas; the micro-batch search; the command line."""
import json

import pytest
import torch

from training.config import apply_overrides, config_from_dict, load_config
from common.tensor_bytes import state_bytes
from training.plan.fit import largest_micro_batch
from training.methods import PLANNED
from training.plan.plan import method_config, plan_memory

TINY = ["model.hidden_size=32", "model.intermediate_size=86", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.vocab_size=512", "model.max_sequence_length=64", "data.seq_len=16",
        "optim.galore_rank=8", "velora.sub_token_size=8", "model.loss_chunk_size=0"]


def tiny(*sets):
    return load_config("configs/llama_tiny.json", TINY + list(sets))


def assert_same(fake: dict, real: dict):
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.02)
    assert set(fake["parts"]) == set(real["parts"])
    for part, n in real["parts"].items():
        assert fake["parts"][part] == pytest.approx(n, rel=0.02, abs=64), part
    assert fake["saved_activations_total"] == pytest.approx(real["saved_activations_total"], rel=0.02)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("method", PLANNED)
def test_fake_step_equals_real_cpu_step(method, dtype):
    for batch in (1, 3):
        fake = plan_memory(tiny(), method, batch, 0, 1, dtype)
        assert_same(fake, plan_memory(tiny(), method, batch, 0, 1, dtype, fake=False))
        assert fake["peak_bytes"] > 0 and fake["parts"]["parameters"] > 0


@pytest.mark.parametrize("sets, dtype", [
    (["velora.codec=velora"], "bf16"), (["velora.codec=sr4"], "bf16"), (["velora.codec=sr8"], "bf16"),
    (["velora.codec=rademacher"], "bf16"), (["velora.codec=gaussian"], "bf16"), (["velora.codec=pca"], "fp32"),
    (["velora.codec=pca"], "bf16"),     # DeepSpeed's bf16 casts pca's basis buffer to bf16
    (["velora.codec=velora", "velora.rank=2", "velora.init=ema:0.9"], "bf16"),
    (["velora.codec=velora", "velora.coef_dtype=int8"], "bf16"),
    (['velora.codec_overrides={"down_proj":"velora"}', "velora.codec=sr2"], "bf16")])
def test_every_codec_runs_under_fake_tensors(sets, dtype):
    cfg = tiny("velora.targets=all", "model.loss_chunk_size=8", "model.recompute_swiglu=true", *sets)
    for batch in (1, 2):
        assert_same(plan_memory(cfg, "full_rank", batch, 0, 1, dtype),
                    plan_memory(cfg, "full_rank", batch, 0, 1, dtype, fake=False))


@pytest.mark.parametrize("method, optim", [("full_rank", "adamw"), ("galore", "galore_adamw"),
                                           ("adamw8bit", "adamw8bit"), ("full_rank", "adafactor")])
def test_parameter_and_optimizer_bytes_are_the_exact_tensor_counts(method, optim):
    """bench_optim_state.py's count: every tensor reachable from the optimizer's state after real steps."""
    from training.build import build_model, seed_everything
    from training.optim import build_optimizer

    cfg = method_config(tiny(f"optim.name={optim}"), method, 2, 0, 1, "fp32")
    plan = plan_memory(cfg, method, 2, 0, 1, "fp32")
    seed_everything(0)
    model, _ = build_model(cfg)
    optimizer, _, _ = build_optimizer(model, cfg)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    for _ in range(2):
        model(ids, labels=ids).backward()
        optimizer.step()
    assert plan["parts"]["parameters"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.untyped_storage().nbytes() for b in model.buffers())
    assert plan["parts"]["optimizer_state"] == state_bytes(optimizer.state)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["full_rank", "velora_all", "sr2_all", "sr2_all_memopts", "full_rank_ckpt"])
def test_saved_activations_equal_velora_memory(method, dtype):
    """velora.memory counts what a training forward saves for backward, by storage; the planner's model is
    DeepSpeed's (cast to bf16, no autocast), so velora.memory measures that same model."""
    from training.build import build_model
    from velora.memory import measure_step

    cfg = method_config(tiny("model.loss_chunk_size=8"), method, 3, 0, 1, dtype)
    plan = plan_memory(cfg, method, 3, 0, 1, dtype)
    model, _ = build_model(cfg)
    if dtype == "bf16":
        model.bfloat16()
    rep = measure_step(model, torch.randint(0, cfg.model.vocab_size, (3, cfg.data.seq_len)))
    assert plan["saved_activations_total"] == rep["saved_total"]


def test_zero_formulas():
    base = plan_memory(tiny(), "full_rank", 2, 0, 1, "bf16")
    p = base["parameters"]
    z2 = plan_memory(tiny(), "full_rank", 2, 2, 4, "bf16")
    by_phase = {ph["name"]: ph["peak_bytes"] for ph in z2["phases"]}
    assert z2["zero_stage"] == 2 and z2["host_bytes"] == 0
    assert z2["parts"]["master_weights"] == 4 * p // 4
    assert z2["parts"]["reduce_buckets"] == 500_000_000 * 2                   # DeepSpeed's default bucket, bf16
    assert max(by_phase.values()) == z2["peak_bytes"]
    off = plan_memory(tiny(), "zero_offload", 2, 0, 1, "bf16")
    assert off["zero_stage"] == 2 and off["offload"] and "optimizer_state" not in off["parts"]
    assert off["host_bytes"] == 4 * p + 4 * p + 2 * p + base["parts"]["optimizer_state"]


def test_largest_micro_batch_is_exact():
    def plan_at(b):                # phases affine in b, or not (a jump past b = 40): the bisection catches it
        phases = [{"cuda_bytes": 1000 + 37 * b}, {"cuda_bytes": 2000 + (500 if b > 40 else 0) + b}]
        return {"phases": phases, "cuda": {"device_bytes": max(p["cuda_bytes"] for p in phases) + 10}}
    for gpu in (100, 2000, 2200, 3000, 10 ** 6):
        want = max([b for b in range(1, 4097) if plan_at(b)["cuda"]["device_bytes"] <= gpu * 0.95], default=0)
        assert largest_micro_batch(plan_at, gpu) == want, gpu


def test_command_line_json(capsys):
    from training.commands.plan import main

    assert main(["--config", "configs/llama_tiny.json", "--methods", "full_rank,sr2_all", "--micro-batch", "2",
                 "--json", "--gpu-gb", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    for m in ("full_rank", "sr2_all"):
        plan = out["methods"][m]
        assert plan["peak_bytes"] == sum(plan["parts"].values())
        assert {"parameters", "gradients", "optimizer_state", "saved_activations", "temporaries"} <= set(plan["parts"])
        assert out["largest_micro_batch"]["0"][m]["1.0"] >= 1
    assert out["methods"]["sr2_all"]["parts"]["saved_activations"] < out["methods"]["full_rank"]["parts"]["saved_activations"]


@pytest.mark.parametrize("argv, fragment", [
    (["--methods", "nope"], "--methods: unknown method 'nope'"),
    (["--zero-stage", "3"], "stage=3: the planner models ZeRO 0-2"),
    (["--micro-batch", "0"], "--micro-batch: expected a positive integer, got 0"),
    (["--micro-batch", "x"], "--micro-batch 'x': expected comma-separated"),
    (["--gpu-gb", "-4"], "--gpu-gb '-4': expected comma-separated positive numbers"),
    (["--world-size", "0"], "--world-size: expected a positive integer, got 0"),
    (["--markdown"], "--markdown prints the largest micro-batch per GPU size: add --gpu-gb"),
])
def test_bad_planner_input_gives_one_line_errors(capsys, argv, fragment):
    from training.commands.plan import main

    assert main(["--config", "configs/llama_tiny.json", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_config_from_dict_round_trip():
    cfg = tiny()
    again = config_from_dict(apply_overrides(cfg.to_dict(), ["train.seed=7"]), cfg.source)
    assert again.train.seed == 7 and again.model == cfg.model


def test_impossible_zero_settings_are_one_line_errors():
    from common.errors import ConfigError
    from training.plan.plan import plan_memory
    from training.plan.zero import zero_settings

    with pytest.raises(ConfigError, match=r"^--zero-stage: expected one of 0, 1, 2, 3, got 5$"):
        plan_memory("configs/llama_tiny.json", "full_rank", 1, 5, 1, "fp32")
    with pytest.raises(ConfigError, match="offload_optimizer needs ZeRO stage 1 or 2; set deepspeed.zero_optimization.stage"):
        zero_settings({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})


@pytest.mark.parametrize("method, sets, gbs", [("full_rank", [], [0.56, 0.58]), ("zero_offload", [], [1.54, 1.56]),
                                               ("sr2_all_chunk", ["model.loss_chunk_size=48"], [0.56, 0.58])])
def test_fit_answers_are_the_largest_that_fit(method, sets, gbs):
    """fit_table's answer b fits and b + 1 does not, by planner runs at both: through the trace
    extrapolation (full_rank, zero_offload) and through the search when the ops change with b (a loss
    chunk of 48 tokens: one at b = 1 and 2, more from b = 4)."""
    from training.plan.cuda import fits
    from training.plan.fit import GIB, fit_table

    cfg = tiny("data.seq_len=16", *sets)
    table = fit_table(cfg, [method], gbs, 0, 1, "bf16")[method]
    for gb, b in table.items():
        assert 1 < b < 4096, (gb, b)
        assert fits(plan_memory(cfg, method, b, 0, 1, "bf16"), int(gb * GIB))
        assert not fits(plan_memory(cfg, method, b + 1, 0, 1, "bf16"), int(gb * GIB))
