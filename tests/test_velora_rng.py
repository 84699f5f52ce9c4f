"""Counter-based random numbers: the tensor hash equals a pure-Python evaluation of its definition
(no overflow, any index), draws look uniform / ±1 / normal, streams differ by key, and sr<k>
rounding with them is unbiased."""
import math

import pytest
import torch

from velora.codecs import rng
from velora.codecs.base import mix_seed
from velora.codecs.quant import sr_decode, sr_encode


def _mix_py(h: int) -> int:
    h ^= h >> 16
    h = h * 0x7FEB352D % 2 ** 32
    h ^= h >> 15
    h = h * 0x5BD1E995 % 2 ** 32
    return h ^ (h >> 16)


def _hash_py(i: int, k0: int, k1: int) -> int:
    """The definition in rng.py, in Python's unbounded integers."""
    return _mix_py(_mix_py((i % 2 ** 32) ^ k0) ^ (i >> 32) ^ k1)


def test_hash_equals_its_definition_for_any_index_and_key():
    key = mix_seed(7, 3, 123456)
    k0, k1 = rng.key_words(key)
    assert key == k0 + (k1 << 32) and k1 < 2 ** 31
    idx = [0, 1, 2, 255, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 17, 2 ** 62 + 5]
    got = rng.hash32(torch.tensor(idx, dtype=torch.int64), k0, k1).tolist()
    assert got == [_hash_py(i, k0, k1) for i in idx]
    assert all(0 <= h < 2 ** 32 for h in got)


def _uniform(shape, k0, k1):
    n = 1
    for size in shape:
        n *= size
    return rng.uniform_at(torch.arange(n), k0, k1).view(shape)


def test_same_key_same_numbers_and_streams_differ():
    shape = (64, 3, 32)
    a = _uniform(shape, *rng.key_words(mix_seed(0, 0, 5)))
    assert torch.equal(a, _uniform(shape, *rng.key_words(mix_seed(0, 0, 5))))
    # A prefix of a longer draw is the shorter draw: numbers depend on the element index only.
    longer = _uniform((128, 3, 32), *rng.key_words(mix_seed(0, 0, 5)))
    assert torch.equal(longer[:64], a)
    others = [mix_seed(1, 0, 5), mix_seed(0, 1, 5), mix_seed(0, 0, 6)]    # layer, rank, forward
    for key in others:
        b = _uniform(shape, *rng.key_words(key))
        assert (a == b).float().mean() < 0.01
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.03


def test_uniform_signs_and_normal_statistics():
    n = 200_000
    k0, k1 = rng.key_words(mix_seed(42, 0, 0))
    u = _uniform((n,), k0, k1).double()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=4 * math.sqrt(1 / 12 / n))
    assert float(u.var()) == pytest.approx(1 / 12, rel=0.01)
    counts = torch.histc(u.float(), bins=16, min=0.0, max=1.0)
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 40                                             # 15 degrees of freedom: p < 0.001
    lag = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(lag) < 4 / math.sqrt(n)                           # neighbours are uncorrelated
    s = rng.signs((n,), k0, k1, "cpu").double()
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 4 / math.sqrt(n)
    z = rng.normal((n,), k0, k1, "cpu").double()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert float(z.var()) == pytest.approx(1.0, rel=0.02)
    assert float((z ** 4).mean()) == pytest.approx(3.0, rel=0.05)        # Gaussian kurtosis


def test_stochastic_rounding_is_unbiased_in_float64():
    """Every group spans [0, 3] (2 bits: step 1), so an element t rounds to floor(t) or floor(t) + 1;
    over many tokens the mean code must be t (E[q] = t up to the 2**-24 grid of u)."""
    tokens, g = 20_000, 32
    t = torch.tensor([0.0, 3.0, 0.25, 1.3, 2.9, 1.0, 0.01, 2.5])
    x = t.repeat(tokens, g // len(t))
    packed, lo, step = sr_encode(x, *rng.key_words(mix_seed(1, 0, 3)), 2, g)
    assert torch.equal(lo, torch.zeros_like(lo)) and torch.equal(step, torch.ones_like(step))
    x_hat = sr_decode(packed, lo, step, 2, g, torch.float64)
    mean = x_hat.mean(0).view(-1, len(t)).mean(0)
    var = (t - t.floor()) * (1 - (t - t.floor()))
    bound = 5 * torch.sqrt(var.double() / (tokens * g // len(t))) + 1e-6
    assert torch.all((mean - t.double()).abs() <= bound), (mean, t)
    assert torch.all(x_hat.floor() == x_hat) and x_hat.min() >= 0 and x_hat.max() <= 3
