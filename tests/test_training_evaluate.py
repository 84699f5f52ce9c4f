"""training.evaluate: token-weighted loss, GaLore's figure, mode handling, and two-rank reduction."""
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from model import LlamaConfig, LlamaForCausalLM
from training.evaluate import evaluate


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_sequence_length=16))


def make_batches(n=3, bsz=2, seq=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 64, (bsz, seq), generator=g)
        labels = ids.clone()
        labels[0, seq - 1 - i:] = -100  # batches with different numbers of predicted tokens
        out.append((ids, labels))
    return out


def reference(model, batches):
    """Per-token losses gathered by hand from the logits."""
    losses, means = [], []
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids)[:, :-1].reshape(-1, 64)
            per_tok = F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100)
            mask = labels[:, 1:].reshape(-1) != -100
            losses.append(per_tok[mask])
            means.append(per_tok[mask].mean().item())
    return torch.cat(losses), means


def test_token_weighted_and_galore_figures():
    model, batches = tiny_model(), make_batches()
    per_tok, means = reference(model, batches)
    r = evaluate(model, batches)
    assert r["tokens"] == per_tok.numel() and r["batches"] == 3
    assert r["loss"] == pytest.approx(per_tok.mean().item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    # GaLore divides the summed batch means by batches + 1 (its counter starts at 1).
    assert r["galore_loss"] == pytest.approx(sum(means) / 4, rel=1e-5)
    assert r["galore_ppl"] == pytest.approx(math.exp(sum(means) / 4), rel=1e-5)


def test_restores_mode_and_needs_no_grad():
    model, batches = tiny_model(), make_batches(n=1)
    model.train()
    evaluate(model, batches)
    assert model.training
    model.eval()
    evaluate(model, batches)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_no_tokens_is_an_error():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="no predicted tokens"):
        evaluate(tiny_model(), [(ids, torch.full_like(ids, -100))])


def _rank_main(rank, world, port, out_path):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = make_batches(n=4)
    mine = batches[:1] if rank == 0 else batches[1:]  # uneven shares
    r = evaluate(tiny_model(), mine)
    if rank == 0:
        torch.save(r, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_reduce_like_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)
    one = evaluate(tiny_model(), make_batches(n=4))
    assert two["tokens"] == one["tokens"] and two["batches"] == 4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    # GaLore's figure: each rank's sum / (its batches + 1), averaged over ranks.
    _, means = reference(tiny_model(), make_batches(n=4))
    expected = (means[0] / 2 + sum(means[1:]) / 4) / 2
    assert two["galore_loss"] == pytest.approx(expected, rel=1e-5)
