"""VeLoRA under DeepSpeed: ZeRO-3 (weights partitioned, gathered for the autograd function) trains
exactly as ZeRO-0, and v ends the same."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)


def _train(_, stage, port, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from model import LlamaConfig, LlamaForCausalLM
    from velora import VeLoRAConfig, apply_velora

    torch.manual_seed(0)
    model, _ = apply_velora(LlamaForCausalLM(LlamaConfig(**TINY)), VeLoRAConfig(targets="all", sub_token_size=8))
    config = {"train_batch_size": 2, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                      config=config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(3):
        loss = engine(ids, labels=ids)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    torch.save({"losses": losses, "v": engine.module.model.layers[1].mlp.up_proj.v.clone()}, out)
    deepspeed.comm.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_matches_zero0(tmp_path):
    pytest.importorskip("deepspeed")
    results = []
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}.pt"
        mp.spawn(_train, args=(stage, _free_port(), str(out)), nprocs=1, join=True)
        results.append(torch.load(out, weights_only=True))
    torch.testing.assert_close(results[1]["losses"], results[0]["losses"], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0]["v"], results[1]["v"])
