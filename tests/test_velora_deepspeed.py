"""VeLoRA and the other codecs under DeepSpeed: ZeRO-3 (weights partitioned, gathered for the autograd
function) trains exactly as ZeRO-0, and the codecs' state (v, pca's basis, forward counters) ends the same."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)
CODECS = {"velora": {}, "hybrid": {"codec": "sr2", "codec_overrides": {"q_proj": "pca", "down_proj": "rademacher"}}}


def _train(_, stage, port, out, codecs):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from model import LlamaConfig, LlamaForCausalLM
    from velora import VeLoRAConfig, apply_velora, stored_bytes

    torch.manual_seed(0)
    model, _ = apply_velora(LlamaForCausalLM(LlamaConfig(**TINY)),
                            VeLoRAConfig(targets="all", sub_token_size=8, refresh_every=2, **CODECS[codecs]))
    config = {"train_batch_size": 2, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                      config=config)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    losses, stored = [], []
    for _ in range(3):
        loss = engine(ids, labels=ids)
        stored.append(stored_bytes(engine.module))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = {k: v.clone() for k, v in engine.module.state_dict().items() if ".codec." in k}
    torch.save({"losses": losses, "codec_state": state, "stored": stored}, out)
    deepspeed.comm.destroy_process_group()



@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("codecs", list(CODECS))
def test_zero3_matches_zero0(tmp_path, codecs):
    pytest.importorskip("deepspeed")
    results = []
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}.pt"
        mp.spawn(_train, args=(stage, free_port(), str(out), codecs), nprocs=1, join=True)
        results.append(torch.load(out, weights_only=True))
    torch.testing.assert_close(results[1]["losses"], results[0]["losses"], rtol=1e-5, atol=1e-5)
    # ZeRO-3 hands each projection a detached alias of its input: q/k/v must still share one encoding
    assert results[0]["stored"] == results[1]["stored"]
    a, b = results[0]["codec_state"], results[1]["codec_state"]
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
