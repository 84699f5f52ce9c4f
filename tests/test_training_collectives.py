"""training/collectives.py: the one way to torch.distributed, on the process group's device.

A static scan proves that no other module of the project calls torch.distributed (or deepspeed.comm) beyond
starting and stopping the process group; the ZeRO 1-3 optimizers are run in two gloo processes with the
host standing in as a GPU would see it (see test_zero_optimizers_hand_collectives_no_host_tensor).
"""
import ast
import os
import pytest
import torch

from conftest import REPO, free_port, spawn_local
from training import collectives

SCANNED = ["training", "data", "velora", "model", "scripts", "train_c4.py"]
# The one place of training/ and data/, and velora/'s own (it imports only torch).
OWNERS = {"training/collectives.py", "velora/codecs/base.py"}
# What any module may use: starting and stopping the process group and its timeouts, and the error a lost peer raises.
LIFECYCLE = {"is_available", "is_initialized", "init_process_group", "destroy_process_group", "build_shm_op",
             "DistError", "distributed_c10d"}   # the error type a failed peer raises; group timeouts at start-up
DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _under(name: str) -> str | None:
    """The torch.distributed / deepspeed.comm member `name` (a dotted path) refers to, '' for the module itself."""
    for module in DIST_MODULES:
        if name == module or name.startswith(module + "."):
            return name[len(module) + 1:].split(".")[0]
    return None


def distributed_uses(source: str) -> set[str]:
    """The torch.distributed / deepspeed.comm members `source` uses (imports and attribute chains, through
    aliases); '' stands for using the module object itself (a bare alias, e.g. passed along)."""
    tree, aliases, used = ast.parse(source), {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and _under(a.name) is not None:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _under(full) == "":
                    aliases[a.asname or a.name] = full
                elif _under(node.module) is not None:
                    used.add(a.name)
    heads = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (name := _dotted(node)):
            head, _, rest = name.partition(".")
            member = _under(".".join(filter(None, [aliases.get(head, head), rest])))
            if member:
                used.add(member)
        elif isinstance(node, ast.Name) and node.id in aliases and id(node) not in heads:
            used.add("")
    return used


def _sources():
    for entry in SCANNED:
        path = REPO / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_no_module_but_the_owners_calls_torch_distributed():
    offenders, scanned = {}, set()
    for path in _sources():
        rel = path.relative_to(REPO).as_posix()
        scanned.add(rel)
        if rel not in OWNERS and (bad := distributed_uses(path.read_text()) - LIFECYCLE):
            offenders[rel] = sorted(bad)
    assert scanned >= OWNERS | {"training/distributed.py", "training/optim/zero_layout.py", "train_c4.py"}
    assert not offenders, f"collectives outside training/collectives.py: {offenders}"


@pytest.mark.parametrize("source, found", [
    ("import torch.distributed as dist\ndist.all_reduce(t)", {"all_reduce"}),
    ("import torch\ntorch.distributed.broadcast(t, 0)", {"broadcast"}),
    ("from torch import distributed\ndistributed.barrier()", {"barrier"}),
    ("from torch.distributed import all_gather_into_tensor as g", {"all_gather_into_tensor"}),
    ("import deepspeed\ndeepspeed.comm.all_reduce(t)", {"all_reduce"}),
    ("from deepspeed import comm as c\nc.get_rank()", {"get_rank"}),
    ("import torch.distributed as dist\nf(dist)", {""}),
    ("import torch.distributed as dist\ndist.is_initialized()\nimport deepspeed\ndeepspeed.init_distributed()",
     {"is_initialized"}),
    ("from deepspeed.comm.torch import build_shm_op", {"build_shm_op"}),
    ("import numpy as np\nnp.broadcast_to(a, 3)\ntorch.broadcast_tensors(a, b)", set()),
])
def test_the_scan_sees_every_way_in(source, found):
    assert distributed_uses(source) == found


def test_one_process_collectives_are_the_identity():
    t = torch.arange(4.0)
    assert collectives.rank() == 0 and collectives.world_size() == 1
    assert collectives.all_reduce_(t) is t and torch.equal(t, torch.arange(4.0))
    assert [torch.equal(g, t) for g in collectives.all_gather(t)] == [True]
    assert collectives.all_reduce_values([1, 2.5, torch.tensor(3.0)]) == [1.0, 2.5, 3.0]
    assert collectives.backend_device() == torch.device("cpu")
    collectives.barrier()


def test_a_tensor_the_backend_cannot_take_is_staged_and_the_result_copied_back(monkeypatch):
    """A non-contiguous view (no backend takes one), or a tensor on another device than the backend's, is
    reduced in a staged copy whose result lands back in the caller's tensor."""
    seen = []

    def fake_all_reduce(t, op, group=None):
        seen.append((t.is_contiguous(), t.device))
        t.mul_(2)                                       # what two ranks holding the same values would sum to

    monkeypatch.setattr(collectives, "world_size", lambda group=None: 2)
    monkeypatch.setattr(collectives.dist, "all_reduce", fake_all_reduce)
    base = torch.arange(12.0).view(3, 4)
    view = base.t()                                     # non-contiguous
    collectives.all_reduce_(view)
    assert seen == [(True, torch.device("cpu"))] and torch.equal(base, 2 * torch.arange(12.0).view(3, 4))
    monkeypatch.setattr(collectives, "backend_device", lambda group=None: torch.device("meta"))
    host = torch.ones(3)
    assert collectives._staged(host, None).device.type == "meta"
    on_device = torch.ones(3, device="meta")
    assert collectives._staged(on_device, None) is on_device


# --- ZeRO 1-3 optimizers, two gloo processes -------------------------------------------------------
# On a GPU the flat partitions live on the CUDA device and a tensor made without a device lands on the
# host, which NCCL refuses. Here the partitions live on the CPU, which gloo takes, and the optimizers' own
# code (the layout exchange at bind time, every step) runs with the default device set to `meta`, so a
# tensor made without a device is not on the backend's device: the check around every collective sees it.
# (galore-torch's step runs with the real default: its host-side temporaries are copied to the gradient's
# device before use and never reach a collective.)


def _default_device(device, fn):
    def wrapped(*args, **kwargs):
        with torch.device(device):
            return fn(*args, **kwargs)
    return wrapped


def _zero_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import galore_torch

    from test_training_optim_zero import OPTIMIZERS, _config, _engine, _train
    from training import build
    from training.optim import zero_layout

    calls, off_device = [], []
    staged = collectives._staged

    def checked(t, group):
        calls.append(t.device.type)
        if t.device != collectives.backend_device(group):
            off_device.append(f"{t.dtype} {tuple(t.shape)} on {t.device}")
        return staged(t, group)

    collectives._staged = checked
    build.partition_layouts = _default_device("meta", zero_layout.partition_layouts)
    zero_layout.PartitionOptimizer.step = _default_device("meta", zero_layout.PartitionOptimizer.step)
    for cls in (galore_torch.GaLoreAdamW, galore_torch.GaLoreAdafactor):
        cls.step = _default_device("cpu", cls.step)
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        results = {}
        for name in OPTIMIZERS:
            for stage in (1, 2, 3):
                del calls[:], off_device[:]
                losses = _train(_engine(_config(name, stage, world)), 1, 2, rank, world)
                results[(name, stage)] = {"calls": len(calls), "off_device": list(off_device), "losses": losses}
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        deepspeed.comm.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_optimizers_hand_collectives_no_host_tensor(tmp_path):
    spawn_local(_zero_worker, (2, free_port(), tmp_path), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert len(results) == 9
        for case, result in results.items():
            assert result["calls"] > 0, case              # the check saw the optimizers' collectives
            assert result["off_device"] == [], (case, result["off_device"])
            assert all(torch.isfinite(torch.tensor(v)) for v in result["losses"].values()), case
