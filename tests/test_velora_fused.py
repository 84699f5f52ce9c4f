"""Fused codecs (velora.fused): the compiled encode and decode equal the eager reference bitwise on CPU.

Each compile costs seconds of C++ build on a cold cache, so the quick run compiles sr2's encode and
decode once (through the layer); the other bit widths, rademacher, gaussian and pca are marked slow.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from velora import VeLoRAConfig
from velora.codecs import fused, rng
from velora.codecs.base import mix_seed
from velora.codecs.pca import pca_decode, pca_encode
from velora.codecs.quant import sr_decode, sr_encode
from velora.codecs.subtoken import random_decode, random_encode
from velora_helpers import compressed

D, OUT = 200, 24            # 200 = one group of 128 + a padded one; 25 sub-tokens of 8
KEY = rng.key_tensors(mix_seed(3, 1, 17), "cpu")


def _x(dtype, tokens=37):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(tokens, D, generator=g) * torch.linspace(0.1, 3.0, D) + 0.5).to(dtype)


def _same(a, b):
    a, b = (a,) if isinstance(a, torch.Tensor) else a, (b,) if isinstance(b, torch.Tensor) else b
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _check(fn, *args):
    eager = fn(*args)
    assert _same(fused.compiled(fn)(*args), eager)
    return eager


def test_auto_fuses_on_cuda_only_and_fake_tensors_run_eager():
    assert not fused.fused_on("auto", torch.device("cpu")) and fused.fused_on("auto", torch.device("cuda"))
    assert fused.fused_on(True, torch.device("cpu")) and not fused.fused_on(False, torch.device("cuda"))
    calls = []

    def fn(t):
        calls.append(t)
        return t
    with FakeTensorMode():
        fused.run(fn, True, torch.empty(3))
    assert len(calls) == 1 and fn not in fused._COMPILED


@pytest.mark.parametrize("value", ["true", 1, None])
def test_bad_fused_value_names_the_culprit(value):
    with pytest.raises(ValueError, match=r'velora.fused: expected "auto" \(compiled on CUDA, eager on CPU\), true or '
                                         r"false, got"):
        VeLoRAConfig(fused=value)


def test_sr2_layer_fused_equals_eager_bitwise_under_bf16():
    """A bf16 step through the layer: stored codes, scales and weight gradient all bitwise equal."""
    layers = []
    for on in (False, True):
        torch.manual_seed(0)
        layers.append(compressed(D, OUT, codec="sr2", fused=on))
    saved, grads = ([], []), []
    for layer, keep in zip(layers, saved):
        for _ in range(2):                          # two forwards: two keys, one compiled graph
            layer.weight.grad = None
            x = _x(torch.float32).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: keep.append(t) or t, lambda t: t):
                y = layer(x)
            y.float().pow(2).sum().backward()
        grads.append((layer.weight.grad, x.grad))
    assert len(saved[0]) == 8 and _same(*saved)     # weight, codes, lo, step per forward
    assert _same(*grads)
    assert sr_encode in fused._COMPILED and sr_decode in fused._COMPILED


@pytest.mark.slow
def test_rademacher_fused_equals_eager_bitwise():
    z = _check(random_encode, _x(torch.float32), *KEY, "rademacher", 8, 2, torch.float32)
    _check(random_decode, z, *KEY, "rademacher", 8, 2, D, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("bits, dtype", [(2, torch.float32), (4, torch.bfloat16), (8, torch.float32)])
def test_sr_fused_equals_eager_bitwise(bits, dtype):
    packed, lo, step = _check(sr_encode, _x(dtype), *KEY, bits, 128)
    _check(sr_decode, packed, lo, step, bits, D, dtype)


@pytest.mark.slow
def test_gaussian_and_pca_fused_equal_eager_bitwise():
    x = _x(torch.float32)
    z = _check(random_encode, x, *KEY, "gaussian", 8, 1, torch.bfloat16)
    _check(random_decode, z, *KEY, "gaussian", 8, 1, D, torch.float32)
    basis = torch.linalg.qr(torch.randn(D, 12, generator=torch.Generator().manual_seed(1))).Q
    c, z = _check(pca_encode, x, basis, *KEY, "rademacher", 16, 1, torch.float32)
    _check(pca_decode, c, z, basis, *KEY, "rademacher", 16, 1, D, torch.bfloat16)
