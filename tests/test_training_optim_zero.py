"""Adafactor and GaLore under ZeRO 1-3 (training/optim/zero_layout.py, zero_adafactor.py, zero_galore.py).

Two gloo processes build tiny models through build_engine and train 20 steps on fixed batches of random
arithmetic sequences (each rank half of the global batch); one process at ZeRO 0 runs torch.optim.Adafactor /
galore-torch itself on the whole batch. One spawn of each runs every case in turn (DeepSpeed starts once),
and each process saves what the assertions need. The model has 3 layers so that a ZeRO 1/2 partition
boundary falls inside a matrix (ZeRO 3 splits every one). fp32, plus two bf16 cases that must track fp32.
"""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import free_port, spawn_local

STEPS, RESUME_AT, BATCH, SEQ, VOCAB = 20, 10, 4, 32, 256
SMALL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_hidden_layers=3",
         "model.num_attention_heads=4", f"model.vocab_size={VOCAB}", f"model.max_sequence_length={SEQ}",
         f"data.seq_len={SEQ}", f"train.max_steps={STEPS}", "optim.lr=0.01", "optim.galore_rank=8",
         "optim.galore_update_proj_gap=5", "velora.targets=none"]
OPTIMIZERS = ("adafactor", "galore_adamw", "galore_adafactor")
CASES = [(name, stage) for name in OPTIMIZERS for stage in (1, 2, 3)]
BF16_CASES = [("adafactor", 2, "bf16"), ("galore_adamw", 3, "bf16")]


def _config(name, stage, world, bf16=False):
    from training.config import load_config

    return load_config("configs/llama_tiny.json", SMALL + [f"deepspeed.bf16.enabled={str(bf16).lower()}",
        f"optim.name={name}", f"deepspeed.zero_optimization.stage={stage}", f"deepspeed.train_batch_size={BATCH}",
        f"deepspeed.train_micro_batch_size_per_gpu={BATCH // world}"])


def _engine(cfg, seed=0):
    from training.build import build_engine, build_model, seed_everything

    seed_everything(seed)
    model, _ = build_model(cfg)
    return build_engine(model, cfg)[0]


def _train(engine, first, last, rank, world):
    """Steps first..last on the same global batches whatever the world size; returns {step: mean loss}."""
    out = {}
    for step in range(first, last + 1):
        g = torch.Generator().manual_seed(step)
        start, stride = torch.randint(0, VOCAB, (BATCH, 1), generator=g), torch.randint(1, 4, (BATCH, 1), generator=g)
        ids = (start + stride * torch.arange(SEQ)) % VOCAB      # learnable: arithmetic sequences
        mine = ids.chunk(world)[rank]
        loss = engine(mine, labels=mine)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        out[step] = total.item() / world
    return out


def _layout_facts(engine):
    """What the DeepSpeed internals we pin say, and whether they mean it: the client optimizer steps the flat
    partitions we map, and each piece of one equals that range of the (fp32, gathered) model parameter."""
    import deepspeed

    from training.optim.zero_layout import partition_layouts

    zero, stage = engine.optimizer, engine.zero_optimization_stage()
    flats = zero.fp32_partitioned_groups_flat if stage == 3 else zero.single_partition_of_fp32_groups
    stepped = [p for g in zero.optimizer.param_groups for p in g["params"]]
    facts = {"flat_is_partition": stage == 3 or all(a is b for a, b in zip(stepped, flats)),
             "pieces_match": True, "split": []}
    layouts, params = partition_layouts(engine), dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        for flat in flats:
            layout = layouts[id(flat)]
            for i, (name, shape) in enumerate(layout.params):
                if len(layout.holders(i)) > 1:
                    facts["split"].append((name, shape, layout.held[0][i], layout.held[1][i]))
            for piece in layout.pieces:
                want = params[piece.name].detach().reshape(-1).narrow(0, piece.start, piece.numel)
                facts["pieces_match"] &= torch.equal(piece.of(flat), want)
    return facts


def _state_shapes(optimizer):
    """{state key: {name: shape}} of every tensor in the client optimizer's state (projector matrices too)."""
    shapes = {}
    for key, state in optimizer.state.items():
        entry = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
        if "projector" in state:
            ortho = state["projector"].ortho_matrix
            entry["projector"] = tuple(ortho.shape)
            entry["projector_storage"] = (ortho.untyped_storage().nbytes() // ortho.element_size(),)
        shapes[key if isinstance(key, str) else "<tensor>"] = entry
    return shapes


def _resume(cfg, rank, world, ckpt_root):
    """Train to RESUME_AT, checkpoint through training.state, rebuild from another seed, load, finish."""
    from training.state import check_pickles, load_checkpoint, save_checkpoint

    engine = _engine(cfg)
    _train(engine, 1, RESUME_AT, rank, world)
    path = save_checkpoint(engine, ckpt_root, RESUME_AT, {"world_size": world}, rank=rank, run_config=cfg,
                           tokenizer_path=None, keep_last=1)
    engine = _engine(cfg, seed=1)
    check_pickles(path)
    load_checkpoint(engine, path, rank)
    return _train(engine, RESUME_AT + 1, STEPS, rank, world)


def _worker(rank, world, port, out, cases):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        results = {}
        for name, stage, *bf16 in cases:
            cfg = _config(name, stage, world, bool(bf16))
            engine = _engine(cfg)
            result = {"losses": _train(engine, 1, STEPS, rank, world)}
            if bf16:
                results[(name, stage, *bf16)] = result
                continue
            if stage:
                result.update(layout=_layout_facts(engine), state=_state_shapes(engine.optimizer.optimizer))
            if stage >= 2:
                result["resumed"] = _resume(cfg, rank, world, out / f"ckpt_{name}_{stage}")
            results[(name, stage)] = result
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        deepspeed.comm.destroy_process_group()


def _spawn(tmp_path, world, cases):
    spawn_local(_worker, (world, free_port(), tmp_path, cases), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process ZeRO 0 results, [rank 0, rank 1] two-process ZeRO 1/2 results)."""
    reference = _spawn(tmp_path_factory.mktemp("zero0"), 1, [(name, 0) for name in OPTIMIZERS])[0]
    return reference, _spawn(tmp_path_factory.mktemp("zero123"), 2, CASES + BF16_CASES)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name, stage", CASES)
def test_two_processes_match_zero0_with_a_split_matrix(runs, name, stage):
    reference, ranks = runs
    split = ranks[0][(name, stage)]["layout"]["split"]
    assert any(len(shape) == 2 and 0 < a < b + a for _, shape, a, b in split), split
    got, want = ranks[0][(name, stage)]["losses"], reference[(name, 0)]["losses"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got, want)
    assert want[STEPS] < want[1] - 0.1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_runs_and_tracks_fp32(runs, case):
    reference, ranks = runs
    got, want = ranks[0][case]["losses"], reference[(case[0], 0)]["losses"]
    assert all(abs(got[s] - want[s]) < 2e-2 for s in want), (got, want)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name, stage", [(name, stage) for name in OPTIMIZERS for stage in (2, 3)])
def test_resume_is_exact(runs, name, stage):
    _, ranks = runs
    result = ranks[0][(name, stage)]
    assert result["resumed"] == {s: result["losses"][s] for s in range(RESUME_AT + 1, STEPS + 1)}


@pytest.mark.slow
@pytest.mark.distributed
def test_adafactor_state_per_rank_is_factored(runs):
    _, ranks = runs
    for rank in ranks:
        state = rank[("adafactor", 2)]["state"]
        pieces = {k: v for k, v in state.items() if k != "<tensor>"}
        assert pieces
        for key, shapes in pieces.items():
            if "row_var" in shapes:
                rows, cols = shapes["row_var"][0], shapes["col_var"][1]
                assert shapes == {"step": (), "row_var": (rows, 1), "col_var": (1, cols)} or \
                    shapes == {"row_var": (rows, 1), "col_var": (1, cols)}, (key, shapes)
            else:
                assert set(shapes) <= {"variance"} and len(shapes["variance"]) == 1, (key, shapes)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_galore_projected_state_lives_once_in_low_rank(runs, name):
    _, ranks = runs
    states = [rank[(name, 2)]["state"] for rank in ranks]
    projected = {k for s in states for k, v in s.items() if "projector" in v}
    assert len(projected) == 3 * 7
    for key in projected:
        owners = [s[key] for s in states if key in s]
        assert len(owners) == 1, key
        assert all(math.prod(shape) <= 8 * 160 for shape in owners[0].values()), owners[0]   # rank x widest


@pytest.mark.slow
@pytest.mark.distributed
def test_pinned_deepspeed_internals_mean_what_we_read(runs):
    import deepspeed

    from training.optim.zero_layout import PINNED

    _, ranks = runs
    assert deepspeed.__version__.startswith("0.19."), "re-check training/optim/zero_layout.py against this DeepSpeed"
    assert PINNED["_hp_mapping"] == ("lp_fragment_address", "hp_fragment_address")
    for rank in ranks:
        for case in CASES:
            facts = rank[case]["layout"]
            assert facts["flat_is_partition"] and facts["pieces_match"], (case, facts)


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_stop_and_resume_two_processes_zero2_galore_is_exact(tmp_path):
    """train_c4.py under torchrun: --stop-at 3, then --resume auto, equals an uninterrupted run bitwise
    (the projector is recomputed at step 5, after the resume)."""
    from conftest import losses, train

    def run(out, *args):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port())]
        return train(out, "optim.name=galore_adafactor", "optim.galore_rank=8", "optim.galore_update_proj_gap=2",
                     "deepspeed.zero_optimization.stage=2", "train.save_every=100", steps=6, args=args,
                     launcher=launcher)

    run(tmp_path / "whole")
    run(tmp_path / "parts", "--stop-at", "3")
    p = run(tmp_path / "parts", "--resume", "auto")
    assert "at step 3" in p.stdout
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6


@pytest.mark.parametrize("start, numel", [(0, 35), (3, 2), (3, 4), (5, 14), (7, 21), (14, 7), (0, 7)])
def test_row_blocks_tile_a_flat_range_into_rectangles(start, numel):
    from training.optim.zero_layout import row_blocks

    rows, cols = 5, 7
    matrix = torch.arange(rows * cols).view(rows, cols)
    piece = matrix.view(-1)[start:start + numel]
    covered = []
    for offset, row, n_rows, col, n_cols in row_blocks(start, numel, cols):
        block = piece[offset:offset + n_rows * n_cols].view(n_rows, n_cols)
        assert torch.equal(block, matrix[row:row + n_rows, col:col + n_cols])
        covered += block.flatten().tolist()
    assert covered == piece.tolist() and len(list(row_blocks(start, numel, cols))) <= 3


def test_bench_optim_state_report_checks_the_goals():
    from types import SimpleNamespace

    from bench_optim_state import report

    found = {("adamw", 0): [(800, 0)], ("adafactor", 0): [(10, 0)], ("galore_adamw", 0): [(600, 100)],
             ("adamw", 2): [(400, 0), (400, 0)], ("adafactor", 2): [(5, 0), (30, 0)],
             ("galore_adamw", 2): [(320, 25), (300, 25)]}
    lines = report(found, SimpleNamespace(world=2))
    assert "| adafactor | 2 | 2 | 5 / 30 | 0.00 | 0.00 | 0.0750 |" in lines
    assert "(goal < 0.05: missed)" in lines[-2] and "ZeRO 0 state / 2 + projectors: 350 bytes" in lines[-1]
    assert lines[-1].endswith("(goal: below it: met)")
