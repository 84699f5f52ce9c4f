"""Activation codecs: exact forward and grad_x, unbiased weight gradients that converge at the rate theory
says, exact round trips where a codec is lossless, and stored bytes equal to the formula."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from velora import CompressedLinear, VeLoRAConfig, apply_velora
from velora.codecs.quant import sr_encode, unpack
from velora.memory import saved_bytes
from velora_helpers import compressed

D, OUT, N, M = 40, 12, 48, 8          # D = 5 sub-tokens of 8, or a group of 32 + a padded one at G = 32
STOCHASTIC = ["sr2", "sr4", "sr8", "rademacher", "gaussian", "pca"]


def _layer(codec, **kw):
    torch.manual_seed(0)
    kw = {"sub_token_size": M, "group_size": 32, "refresh_every": 10**6, **kw}
    return compressed(D, OUT, codec=codec, **kw)


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * torch.linspace(0.2, 2.0, D) + 0.3
    return x, torch.randn(N, OUT, generator=g)


def _grad(layer, x, gy):
    layer.weight.grad = None
    layer(x.detach().requires_grad_()).backward(gy)
    return layer.weight.grad.double()


def _sub_token_error(x, m, plus):
    """Σ over sub-tokens of (m' ± 1) ||x_sub||², m' the real width of each (the tail may be shorter)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], m):
        sub = x[:, start:start + m].double()
        total += (sub.shape[1] + plus) * sub.pow(2).sum(1)
    return total


def expected_sq_error(layer, x) -> torch.Tensor:
    """E ||x̂_n - x_n||² per token, from each codec's definition (independent of the implementation)."""
    c = layer.codec
    if c.name == "rademacher":
        return _sub_token_error(x, c.sub_token_size, -1) / c.rank
    if c.name == "gaussian":
        return _sub_token_error(x, c.sub_token_size, +1) / c.rank
    if c.name == "pca":
        u = c.basis.double()
        residual = x.double() - x.double() @ u @ u.t()
        return _sub_token_error(residual, c._residual.sub_token_size, -1) / c._residual.rank
    # sr<k>: q = floor(t + u) has variance f (1 - f), f the fractional part of t = (x - lo) / step
    levels = 2 ** c.bits - 1
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for start in range(0, D, c.group_size):
        g = x[:, start:start + c.group_size].double()
        lo = torch.minimum(g.min(1, keepdim=True).values, g[:, -1:])  # the replicated padding adds no range
        step = (g.max(1, keepdim=True).values - lo) / levels
        f = torch.frac((g - lo) / step)
        total += (step.pow(2) * f * (1 - f)).sum(1)
    return total


@pytest.mark.parametrize("codec", STOCHASTIC)
def test_forward_and_grad_x_are_exact(codec):
    layer = _layer(codec)
    lin = nn.Linear(D, OUT, bias=False)
    lin.weight.data.copy_(layer.weight.data)
    x, gy = _data()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xa)
    assert torch.equal(y, lin(xb))
    y.backward(gy)
    lin(xb).backward(gy)
    torch.testing.assert_close(xa.grad, xb.grad)


@pytest.mark.slow
@pytest.mark.parametrize("codec", STOCHASTIC)
def test_unbiased_and_converging_at_the_theoretical_rate(codec):
    layer = _layer(codec)
    x, gy = _data()
    exact = gy.double().t() @ x.double()
    samples = torch.stack([_grad(layer, x, gy) for _ in range(400)])
    # One pass: E ||Ĝ - G||² = Σ_n ||gy_n||² E ||x̂_n - x_n||² (independent, zero-mean token errors).
    theory = float((gy.double().pow(2).sum(1) * expected_sq_error(layer, x)).sum())
    single = float((samples - exact).pow(2).sum((1, 2)).mean())
    assert single == pytest.approx(theory, rel=0.15), (single, theory)
    # The mean of n passes: error² ≈ theory / n, at n = 100 and n = 400 (a fixed bias would not shrink).
    for n in (100, 400):
        err = float((samples[:n].mean(0) - exact).pow(2).sum())
        assert 0.4 * theory / n < err < 2.5 * theory / n, (n, err, theory / n)


def test_sr8_is_exact_on_values_that_fit_and_constant_groups_for_every_k():
    x = torch.randint(0, 256, (N, D)).float() * 0.125 - 16.0     # on the grid of each 8-bit group
    x[:, 0], x[:, 1] = -16.0, 255 * 0.125 - 16.0                  # every group spans exactly 255 steps
    x[:, 32], x[:, 33] = -16.0, 255 * 0.125 - 16.0
    gy = torch.randn(N, OUT)
    exact = gy.t() @ x
    torch.testing.assert_close(_grad(_layer("sr8"), x, gy).float(), exact, rtol=0, atol=1e-4)
    const = torch.full((N, D), 0.7)
    for codec in ("sr2", "sr4", "sr8"):
        torch.testing.assert_close(_grad(_layer(codec), const, gy).float(), gy.t() @ const, rtol=0, atol=1e-5)


def test_pca_is_exact_when_the_input_lies_in_its_principal_subspace():
    layer = _layer("pca")
    p = layer.codec.principal
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, p - 1, generator=g) @ torch.randn(p - 1, D, generator=g)
    gy = torch.randn(N, OUT, generator=g)
    torch.testing.assert_close(_grad(layer, x, gy).float(), gy.t() @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_are_packed_densely_first_code_in_the_low_bits(bits):
    q = torch.randint(0, 2 ** bits, (3, 5, 32), dtype=torch.uint8)
    q[:, :, 0], q[:, :, 1] = 0, 2 ** bits - 1                # each group spans [0, levels]: step 1, codes exact
    packed, lo, step = sr_encode(q.float().view(3, -1), 11, 12, bits, 32)
    assert torch.equal(lo, torch.zeros(3, 5)) and torch.equal(step, torch.ones(3, 5))
    assert packed.shape == (3, 5, 32 * bits // 8) and packed.dtype == torch.uint8
    per = 8 // bits
    expected = sum(q.view(3, 5, -1, per)[..., j].int() << (bits * j) for j in range(per))
    assert torch.equal(packed.int(), expected)
    assert torch.equal(unpack(packed, bits), q)


@pytest.mark.parametrize("codec", ["velora"] + STOCHASTIC)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_stored_bytes_equal_the_formula(codec, dtype):
    layer = _layer(codec)
    x, _ = _data()

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return layer(x.requires_grad_()).float().sum()

    saved = sum(saved_bytes(layer, step).values())
    per_token = layer.codec.stored_bytes_per_token(dtype or torch.float32)
    snapshot = layer.codec.v.numel() * 4 if codec == "velora" else 0     # velora also keeps v as it was
    assert saved == per_token * N + snapshot == layer.codec.last_stored_bytes
    assert per_token < D * 4 / 2 or codec == "sr8"       # well under half of fp32 x (sr8 with G = 32: half)


def test_sr2_stores_2_bits_per_value_plus_the_group_scales():
    assert _layer("sr2", group_size=128).codec.stored_bytes_per_token(torch.float32) == 1 * (128 * 2 // 8 + 8)


@pytest.mark.parametrize("codec", STOCHASTIC)
def test_seeded_reproducible_and_resumed_exactly(codec):
    """The noise depends on (seed, layer, rank, forward count) only: a layer restored from a state dict
    draws what the original draws next; another seed draws something else."""
    x, gy = _data()
    a = _layer(codec)
    _grad(a, x, gy)
    b = _layer(codec)
    b.load_state_dict(a.state_dict())
    assert torch.equal(_grad(a, x, gy), _grad(b, x, gy))
    other = _layer(codec, seed=5)
    other.load_state_dict({k: v for k, v in a.state_dict().items() if k != "codec.forwards"}, strict=False)
    assert not torch.equal(_grad(a, x, gy), _grad(other, x, gy))


def test_codec_overrides_make_hybrids_per_input_group():
    from model import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    cfg = VeLoRAConfig(targets="all", codec="sr2", codec_overrides={"down_proj": "velora"}, sub_token_size=8)
    model, summary = apply_velora(model, cfg)
    layer = model.model.layers[0]
    assert [g.codec.name for g in summary.groups] == ["sr2", "sr2", "velora"]
    assert layer.self_attn.q_proj.codec is layer.self_attn.v_proj.codec
    assert not isinstance(layer.self_attn.o_proj, CompressedLinear)           # `all` leaves o_proj out
    assert "sr2 G=128" in str(summary) and "velora M=8 r=1" in str(summary)
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(codec="sr3"), "velora.codec: unknown codec 'sr3'"),
    (dict(codec_overrides={"down": "sr2"}), "velora.codec_overrides: unknown projection 'down'"),
    (dict(codec_overrides={"down_proj": "int2"}), "velora.codec_overrides.down_proj: unknown codec 'int2'"),
    (dict(codec="sr2", coef_dtype="int8", targets="all"), "coef_dtype=int8 applies to the velora codec only"),
    (dict(group_size=0), "velora.group_size: must be a positive int"),
    (dict(rank=9, sub_token_size=8, targets="all"), "velora.rank=9 exceeds the sub-token size M=8"),
])
def test_bad_codec_settings_name_the_culprit(kwargs, message):
    with pytest.raises(ValueError) as e:
        VeLoRAConfig(**kwargs)
    assert message in str(e.value)


def test_sr_group_size_must_pack_into_bytes():
    with pytest.raises(ValueError, match="multiple of 4"):
        _layer("sr2", group_size=30)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_activation_checkpointing_recompute_draws_the_same_noise(fused):
    from model import LlamaConfig, LlamaForCausalLM
    ids = torch.randint(0, 64, (2, 8))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, activation_checkpointing=ckpt))
        model, _ = apply_velora(model, VeLoRAConfig(targets="all", codec="rademacher", sub_token_size=8, fused=fused,
                                                    codec_overrides={"down_proj": "sr2", "q_proj": "pca"}))
        for _ in range(2):
            model.zero_grad()
            model(ids, labels=ids).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_noise_differs_between_forwards_and_layers():
    layer = _layer("rademacher")
    x, gy = _data()
    assert not torch.equal(_grad(layer, x, gy), _grad(layer, x, gy))
    assert int(layer.codec.forwards) == 2
    assert not math.isclose(layer.codec.forward_seed(0), layer.codec.forward_seed(1))
    assert F.cosine_similarity(_grad(layer, x, gy).flatten(), (gy.t() @ x).double().flatten(), dim=0) > 0.2


@pytest.mark.parametrize("codec", ["velora"] + STOCHASTIC)
def test_codecs_run_under_fake_tensor_mode(codec):
    """The memory planner runs a step on fake tensors: no codec may read a device value."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        layer = _layer(codec)
        layer.load_state_dict(layer.state_dict())
        for _ in range(2):
            x = torch.randn(N, D, requires_grad=True)
            layer(x).sum().backward()
        assert layer.weight.grad.shape == (OUT, D)


class _OfficialVeLoRA(torch.autograd.Function):
    """The official VeLoRA backward (roymiles/VeLoRA velora.py), written out independently: x̂ = z v in
    float16, a per-sequence float16 grad_yᵀ x̂ times the scale, returned with a batch dimension that
    autograd sums away in float16."""

    @staticmethod
    def forward(ctx, x, weight, z, v, scale):
        ctx.scale, ctx.shape = scale, x.shape
        ctx.save_for_backward(z, v)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_y):
        z, v = ctx.saved_tensors
        x_hat = torch.einsum("h, r s -> h s", z, v).view(ctx.shape)
        grad_w = torch.matmul(torch.transpose(grad_y.to(x_hat.dtype), 1, 2), x_hat)
        return None, ctx.scale * grad_w, None, None, None


def test_float16_coefficients_and_grad_scale_follow_the_official_code_bitwise():
    b, t, d, out, m = 3, 10, 48, 20, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, t, d, generator=g) + 0.5
    weight = torch.randn(out, d, generator=g) * 0.1
    gy = torch.randn(b, t, out, generator=g) * 1e-4      # small, as a mean loss's gradients are
    x16 = x.to(torch.float16).view(-1, m)
    v16 = F.normalize(x16.mean(0), p=2, dim=-1).unsqueeze(0)
    w_ref = weight.clone().requires_grad_(True)
    _OfficialVeLoRA.apply(x, w_ref, torch.einsum("h s, r s -> h", x16, v16), v16, 1.5).backward(gy)

    layer = compressed(d, out, sub_token_size=m, coef_dtype="float16", grad_scale=1.5)
    layer.weight.data.copy_(weight)
    layer(x).backward(gy)
    assert torch.equal(layer.codec.v, v16.float())
    assert torch.equal(layer.weight.grad, w_ref.grad)


def test_grad_scale_scales_the_velora_weight_gradient():
    x, gy = _data()
    grads = [_grad(_layer("velora", grad_scale=s), x, gy)[1] for s in (1.0, 1.5)]
    torch.testing.assert_close(grads[1], 1.5 * grads[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": "all", "codec": "sr2", "grad_scale": 1.5}, "velora.grad_scale=1.5 applies to the velora codec"),
    ({"targets": "all", "codec": "sr2", "coef_dtype": "float16"}, "velora.coef_dtype=float16 applies"),
    ({"targets": "paper", "grad_scale": 0.0}, "velora.grad_scale: must be positive"),
])
def test_official_options_are_velora_only(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VeLoRAConfig(**kwargs)
