"""scripts/bench_data.py --per-core: the GPU's consumption estimate and the per-core pipeline rate."""
import math

from bench_data import gpu_consumption, per_core_rate

from conftest import NumTokenizer, cfg_for, make_corpus
from training.config import load_config
from training.metrics import flops_per_token


def test_consumption_is_mfu_times_peak_over_model_flops_per_position():
    cfg = load_config("configs/llama_60m.json")
    assert math.isclose(gpu_consumption(cfg, "H100", 0.4), 0.4 * 989e12 / flops_per_token(cfg.model, 256))


def test_per_core_rate_counts_positions_over_whole_chunks(tmp_path):
    make_corpus(tmp_path, [23, 31])
    cpu_rate, wall_rate = per_core_rate(cfg_for(tmp_path), NumTokenizer(), batch_size=2, chunks=2)
    assert cpu_rate > 0 and wall_rate > 0
