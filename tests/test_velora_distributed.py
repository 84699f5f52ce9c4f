"""Two gloo processes fed different first batches end with the same codec state (statistics reduced
first: velora's v, pca's principal directions), while the random codecs draw different noise per rank."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import spawn_local
from velora_helpers import compressed


def _batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4 + 2 * rank, 20, generator=g) + (rank + 1.0) * torch.arange(20) / 10


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layers = [compressed(20, 3, sub_token_size=8), compressed(20, 3, sub_token_size=8, rank=2)]
        for layer in layers:
            layer(_batch(rank).requires_grad_()).sum().backward()
        pca = compressed(20, 3, sub_token_size=4, codec="pca")
        sr2 = compressed(20, 3, codec="sr2", group_size=4)
        for layer in (pca, sr2):
            layer(_batch(rank).requires_grad_()).sum().backward()
        torch.save({"v": [layer.codec.v for layer in layers], "pca": pca.codec.basis, "sr2_forwards": sr2.codec.forwards,
                    "sr2_seed": sr2.codec.forward_seed(0)}, f"{out_dir}/v{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_with_different_batches_agree_on_v(tmp_path):
    spawn_local(_worker, (str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    s0, s1 = (torch.load(tmp_path / f"v{r}.pt", weights_only=True) for r in (0, 1))
    v0, v1 = s0["v"], s1["v"]
    for a, b in zip(v0, v1):
        assert torch.equal(a, b)
    assert torch.equal(s0["pca"], s1["pca"]) and torch.count_nonzero(s0["pca"]) > 0
    assert int(s0["sr2_forwards"]) == int(s1["sr2_forwards"]) == 1 and s0["sr2_seed"] != s1["sr2_seed"]
    # Rank 1: the mean sub-token over both ranks' tokens (zero-padded tail), normalised.
    x = torch.cat([_batch(0), _batch(1)])
    sub = F.pad(x, (0, 4)).reshape(-1, 8)
    torch.testing.assert_close(v0[0][0], F.normalize(sub.mean(0), dim=0))
    alone = F.normalize(F.pad(_batch(0), (0, 4)).reshape(-1, 8).mean(0), dim=0)
    assert not torch.allclose(v0[0][0], alone, atol=1e-3)
