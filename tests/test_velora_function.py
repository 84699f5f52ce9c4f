"""VeLoRA's autograd function: exact forward, exact grad_x, grad_W from the coarse reconstruction."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from velora_helpers import compressed


def _pair(d_in, d_out, m, rank=1, bias=False, seed=0):
    """An nn.Linear and a CompressedLinear (velora codec) with the same weights."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    vl = compressed(d_in, d_out, bias=bias, sub_token_size=m, rank=rank)
    vl.load_state_dict(lin.state_dict(), strict=False)
    return lin, vl


def _reconstruct64(x, v):
    """x̂ = (x_sub vᵀ) v in float64, written from the definition (zero-padded tail)."""
    x, v = x.double().reshape(-1, x.shape[-1]), v.double()
    d, m = x.shape[1], v.shape[1]
    k = math.ceil(d / m)
    xp = torch.zeros(x.shape[0], k * m, dtype=torch.float64)
    xp[:, :d] = x
    sub = xp.reshape(-1, k, m)
    xh = torch.einsum("nkr,rm->nkm", torch.einsum("nkm,rm->nkr", sub, v), v)
    return xh.reshape(x.shape[0], k * m)[:, :d]


@pytest.mark.parametrize("d_in,m,rank,bias", [(32, 8, 1, False), (30, 8, 1, True), (40, 8, 3, False)])
def test_forward_and_gradients(d_in, m, rank, bias):
    lin, vl = _pair(d_in, 24, m, rank, bias)
    x = torch.randn(3, 5, d_in, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = vl(x), lin(x2)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    # grad_W against an independent float64 evaluation of grad_yᵀ x̂.
    xh = _reconstruct64(x.detach(), vl.codec.v)
    expected = g.double().reshape(-1, 24).t() @ xh
    torch.testing.assert_close(vl.weight.grad.double(), expected, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(vl.bias.grad, lin.bias.grad)


def test_full_rank_orthonormal_is_exact():
    m = 8
    lin, vl = _pair(32, 16, m, rank=m, bias=True)
    vl.codec.init = "random"          # keep the orthonormal v set below
    q = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64)).Q
    vl.codec.v.copy_(q.t().float())
    vl.codec.initialized.fill_(True)
    x = torch.randn(4, 7, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = 0.1 * torch.randn(4, 7, 16)      # gradient scale of a real loss; atol is absolute
    vl(x).backward(g)
    lin(x2).backward(g)
    for a, b in [(x.grad, x2.grad), (vl.weight.grad, lin.weight.grad), (vl.bias.grad, lin.bias.grad)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_autocast_matches_linear_and_keeps_dtypes():
    lin, vl = _pair(64, 32, 16)
    x = torch.randn(2, 8, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = vl(x), lin(x2)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, y_ref)
        y.float().sum().backward()       # backward inside autocast must still be right
        y_ref.float().sum().backward()
    assert x.grad.dtype == torch.float32 and vl.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x2.grad)
    xh = _reconstruct64(x.detach(), vl.codec.v)
    expected = torch.ones(16, 32, dtype=torch.float64).t() @ xh
    torch.testing.assert_close(vl.weight.grad.double(), expected, rtol=2e-2, atol=2e-2)


def test_bf16_parameters():
    lin, vl = _pair(48, 16, 16, bias=True)
    lin, vl = lin.bfloat16(), vl.bfloat16()
    x = torch.randn(2, 4, 48, dtype=torch.bfloat16, requires_grad=True)
    y = vl(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, lin(x.detach()))
    y.sum().backward()
    assert x.grad.dtype == vl.weight.grad.dtype == vl.bias.grad.dtype == torch.bfloat16
    expected = torch.ones(8, 16, dtype=torch.float64).t() @ _reconstruct64(x.detach(), vl.codec.v)
    torch.testing.assert_close(vl.weight.grad.double(), expected, rtol=2e-2, atol=2e-2)


def test_int8_coefficients_close_to_compute_dtype():
    torch.manual_seed(0)
    a = compressed(64, 16, sub_token_size=8)
    b = compressed(64, 16, sub_token_size=8, coef_dtype="int8")
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64) + 1.0
    a(x).sum().backward()
    b(x).sum().backward()
    assert b.codec.last_stored_bytes < a.codec.last_stored_bytes
    torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=0.02, atol=0.02)


def test_eval_and_no_grad_are_plain_linear_and_leave_v():
    lin, vl = _pair(32, 8, 8)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(vl(x), F.linear(x, lin.weight))
    vl.eval()
    y = vl(x.requires_grad_())
    assert torch.equal(y, lin(x))
    assert y.grad_fn.name() != "CompressedLinearBackward"
    assert not vl.codec.initialized and torch.count_nonzero(vl.codec.v) == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_weight_grad_is_one_matmul_in_the_compute_dtype(monkeypatch, autocast):
    """Under bf16 autocast, grad_W is bf16 grad_y times bf16 x̂ (fp32 accumulation inside the matmul),
    not an fp32 matmul; in fp32 it stays fp32."""
    from velora.codecs.quant import StochasticRounding
    torch.manual_seed(0)
    layer = compressed(64, 24, codec="sr2", group_size=32)
    seen = []
    decode = StochasticRounding.decode
    monkeypatch.setattr(StochasticRounding, "decode", lambda self, *a: seen.append(decode(self, *a)) or seen[-1])
    x = torch.randn(3, 5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    (x_hat,) = seen
    assert x_hat.dtype == (torch.bfloat16 if autocast else torch.float32)
    expected = gy.reshape(-1, 24).t().matmul(x_hat).to(layer.weight.dtype)
    assert torch.equal(layer.weight.grad, expected)


@pytest.mark.parametrize("ckpt", [False, True])
def test_a_shared_input_is_decoded_once_for_all_its_projections(monkeypatch, ckpt):
    from model import LlamaConfig, LlamaForCausalLM
    from velora import VeLoRAConfig, apply_velora
    from velora.codecs.quant import StochasticRounding
    calls = []
    decode = StochasticRounding.decode
    monkeypatch.setattr(StochasticRounding, "decode", lambda self, *a: calls.append(self) or decode(self, *a))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, activation_checkpointing=ckpt))
    model, summary = apply_velora(model, VeLoRAConfig(setting="sr2_all"))
    ids = torch.randint(0, 64, (2, 8))
    for step in range(2):
        calls.clear()
        model(ids, labels=ids).backward()
        assert len(calls) == len(summary.groups) == 6 and len({id(c) for c in calls}) == 6
    for g in summary.groups:
        assert g.codec._cache["share"].x_hat is None        # released by the last projection's backward
