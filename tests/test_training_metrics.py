"""Run reporting: train_log.jsonl, TensorBoard, the summary line, FLOPs and peaks."""
import json

import torch

from model import LlamaConfig
from training.metrics import Metrics, flops_per_token, peak_flops, peak_memory


def make(tmp_path, start_step=0, peak=None):
    return Metrics(tmp_path, is_main=True, max_steps=4, start_step=start_step, log_every=2,
                   device=torch.device("cpu"), flops_per_token=1.0, peak=peak, world_size=1)


def test_log_records_summary_and_tensorboard(tmp_path, capsys):
    m = make(tmp_path)
    m.run_config({"train": {"max_steps": 4}})
    for step in (1, 2, 3, 4):
        m.train_step(step, loss=5.0 - step, lr=1e-3, grad_norm=0.5, tokens_seen=100 * step, step_tokens=100,
                     step_positions=120, step_time=0.1, velora_bytes=1234 if step == 4 else None)
    m.evaluation(4, {"loss": 1.0, "ppl": 2.718, "galore_loss": 0.5, "galore_ppl": 1.65, "tokens": 10, "batches": 1})
    m.close()
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("eval", 4)]
    assert records[1]["loss"] == 1.0 and records[1]["velora_stored_bytes"] == 1234 and records[1]["peak_rss"] > 0
    captured = capsys.readouterr()
    out = captured.out
    assert "\r" not in captured.err                 # not a terminal: no progress-bar redraws
    assert "step 2/4 | loss 3.0000 | lr 1.000e-03 | grad norm 0.500 | 1.0k tok/s" in out
    assert "eval at step 4: loss 1.0000 | ppl 2.72 (token-weighted) | galore_ppl 1.65" in out
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert '"max_steps": 4' in events.Tensors("run_config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_resume_drops_records_after_the_restored_step(tmp_path):
    m = make(tmp_path)
    for step in (1, 2, 3, 4):
        m.train_step(step, loss=1.0, lr=1e-3, grad_norm=None, tokens_seen=0, step_tokens=1, step_positions=1, step_time=1.0)
    m.close()
    make(tmp_path, start_step=2).close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2]


def test_mfu_counts_processed_positions_and_memory_is_logged_at_log_steps(tmp_path):
    m = make(tmp_path, peak=1000.0)
    for step in (1, 2):
        m.train_step(step, loss=1.0, lr=1e-3, grad_norm=None, tokens_seen=0, step_tokens=100, step_positions=150,
                     step_time=0.5)
    m.close()
    record = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert record["mfu"] == 150 * 1.0 / (0.5 * 1000.0) and record["tokens_per_s"] == 200.0
    assert record["peak_rss"] > 0


def test_flops_and_peaks():
    cfg = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, max_sequence_length=32)
    matmul = 2 * (4 * 8 * 8 + 3 * 8 * 16) + 8 * 100
    assert flops_per_token(cfg, 32) == 6 * matmul + 12 * 2 * 8 * 32
    assert peak_flops(torch.device("cpu"), bf16=True) == (None, "MFU: not reported on CPU")
    assert set(peak_memory(torch.device("cpu"))) == {"mem/peak_rss"}


def test_flops_per_token_equals_torch_flop_counter_at_the_training_sequence_length():
    """One forward + backward counted by torch (SDPA through its math kernel, whose bmm the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model import LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                      num_attention_heads=4, max_sequence_length=1024)
    batch, seq_len = 2, 256                       # training runs shorter than max_sequence_length
    ids = torch.randint(0, 512, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        LlamaForCausalLM(cfg)(ids, labels=ids).backward()
    measured = counter.get_total_flops() / (batch * seq_len)
    assert abs(flops_per_token(cfg, seq_len) / measured - 1) < 0.02

