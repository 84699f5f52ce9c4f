"""VeLoRA layers: init rules for v, buffers in state_dict, widths M does not divide, bad arguments."""
import math

import pytest
import torch
import torch.nn.functional as F

from velora_helpers import compressed


def _sub_tokens(x, m):
    d = x.shape[-1]
    k = math.ceil(d / m)
    return F.pad(x.reshape(-1, d), (0, k * m - d)).reshape(-1, m)


def _step(layer, x):
    layer(x.requires_grad_()).sum().backward()


def test_batch_average_once_sets_v_from_first_batch_then_freezes():
    layer = compressed(30, 8, sub_token_size=8)        # 30 = 3 x 8 + 6: zero-padded tail
    assert not layer.codec.initialized
    x1 = torch.randn(4, 5, 30) + 0.5
    _step(layer, x1)
    expected = F.normalize(_sub_tokens(x1, 8).mean(0), dim=0)
    torch.testing.assert_close(layer.codec.v[0], expected)
    assert layer.codec.initialized
    _step(layer, torch.randn(4, 5, 30) - 3.0)
    torch.testing.assert_close(layer.codec.v[0], expected)


def test_batch_average_recomputes_every_step():
    layer = compressed(16, 4, sub_token_size=4, init="batch_average")
    for _ in range(2):
        x = torch.randn(6, 16) + torch.randn(16)
        _step(layer, x)
        torch.testing.assert_close(layer.codec.v[0], F.normalize(_sub_tokens(x, 4).mean(0), dim=0))


def test_ema_follows_its_rule():
    layer = compressed(16, 4, sub_token_size=4, init="ema:0.9")
    x1, x2 = torch.randn(6, 16) + 1.0, torch.randn(6, 16) - 0.2
    _step(layer, x1)
    s1 = _sub_tokens(x1, 4).mean(0)
    torch.testing.assert_close(layer.codec.v[0], F.normalize(s1, dim=0))
    _step(layer, x2)
    s2 = 0.9 * s1 + 0.1 * _sub_tokens(x2, 4).mean(0)
    torch.testing.assert_close(layer.codec.v[0], F.normalize(s2, dim=0))
    torch.testing.assert_close(layer.codec.stat, s2)


def test_rank_r_uses_top_eigenvectors_of_second_moment():
    layer = compressed(24, 4, sub_token_size=6, rank=2)
    x = torch.randn(50, 24) * torch.linspace(0.1, 2.0, 24)
    _step(layer, x)
    s = _sub_tokens(x, 6).double()
    vals, vecs = torch.linalg.eigh(s.t() @ s / s.shape[0])
    top = vecs[:, -2:].flip(1).t()
    # Same subspace, orthonormal rows (signs are a convention).
    torch.testing.assert_close((layer.codec.v.double() @ top.t()).abs(), torch.eye(2, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.codec.v @ layer.codec.v.t(), torch.eye(2), atol=1e-5, rtol=0)


def test_random_init_is_seeded_and_unit_norm():
    a = compressed(32, 4, sub_token_size=8, init="random", seed=3)
    b = compressed(32, 4, sub_token_size=8, init="random", seed=3)
    assert a.codec.initialized and torch.equal(a.codec.v, b.codec.v)
    torch.testing.assert_close(a.codec.v.norm(dim=1), torch.ones(1))
    v0 = a.codec.v.clone()
    _step(a, torch.randn(3, 32))
    assert torch.equal(a.codec.v, v0)


def test_state_dict_round_trip_keeps_v_and_initialized():
    a = compressed(20, 4, sub_token_size=8)
    _step(a, torch.randn(3, 20) + 1)
    sd = a.state_dict()
    assert {"weight", "codec.v", "codec.initialized"} <= set(sd)
    b = compressed(20, 4, sub_token_size=8)
    b.load_state_dict(sd)
    assert b.codec.initialized and torch.equal(b.codec.v, a.codec.v)
    v = b.codec.v.clone()
    _step(b, torch.randn(3, 20) - 5)      # initialized: a resumed run does not re-initialise
    assert torch.equal(b.codec.v, v)
    b.load_state_dict(compressed(20, 4, sub_token_size=8).state_dict())     # not initialised
    x = torch.randn(3, 20) + 2
    _step(b, x)
    torch.testing.assert_close(b.codec.v[0], F.normalize(_sub_tokens(x, 8).mean(0), dim=0))


def test_non_divisible_width_5461():
    layer = compressed(5461, 3, sub_token_size=64)
    x = torch.randn(2, 5461)
    _step(layer, x)
    assert layer.codec.last_stored_bytes == 2 * 86 * 4 + 64 * 4    # z (2 tokens x 86) + v snapshot
    assert layer.weight.grad.shape == (3, 5461)


@pytest.mark.parametrize("kwargs,message", [
    (dict(sub_token_size=4, rank=5), "velora.rank=5 exceeds the sub-token size M=4 of a 16-wide input"),
    (dict(init="ema:1.5"), "init: expected batch_average_once"),
    (dict(init="average"), "init: expected batch_average_once"),
    (dict(coef_dtype="fp8"), "velora.coef_dtype: expected one of compute, int8, float16"),
])
def test_bad_arguments_name_the_culprit(kwargs, message):
    with pytest.raises(ValueError) as e:
        compressed(16, 4, **kwargs)
    assert message in str(e.value)
