"""The Triton kernels themselves (interpreter on CPU, compiled on a GPU) vs fp64 references."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, ON_GPU, assert_close

import importlib

from kronops.kernels.kron.factor_grad import triton_kron_factor_grad as kron_factor_grad
from kronops.kernels.kron.rows import launch_kron_rows as kron_rows

# (M, a1, a2, b1, b2): odd, prime, unequal, tile-spanning and LoKr-like shapes.
SHAPES = [(1, 1, 1, 1, 1), (7, 3, 5, 7, 11), (13, 16, 16, 16, 16), (5, 20, 70, 33, 9),
          (3, 2, 3, 130, 67), (19, 67, 2, 5, 3)]


def make(shape, dtype, *, transposed_x=False):
    m, a1, a2, b1, b2 = shape
    kw = dict(device=KERNEL_DEVICE, dtype=dtype)
    if transposed_x:  # x[m] stored as X_m^T: a non-contiguous (M, a2, b2) view
        x = torch.randn(m, b2, a2, **kw).transpose(1, 2)
    else:  # rows with padding between them: row stride > a2*b2
        x = torch.randn(m, a2 * b2 + 3, **kw)[:, 1:1 + a2 * b2].view(m, a2, b2)
    return x, torch.randn(a1, a2, **kw), torch.randn(b1, b2, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("transposed_x", [False, True])
def test_kron_rows(shape, dtype, transposed_x):
    x, a, b = make(shape, dtype, transposed_x=transposed_x)
    bias = torch.randn(a.shape[0] * b.shape[0], device=x.device, dtype=dtype)
    y = kron_rows(x, a, b, bias, 0.75)
    xd, ad, bd = x.double(), a.double(), b.double()
    product = 0.75 * (xd.reshape(x.shape[0], -1) @ torch.kron(ad, bd).T)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close(y, product + bias.double(), dtype, "kron_rows",
                 magnitude=(product.norm() + bias.double().norm() * x.shape[0] ** 0.5).item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kron_rows_transposed_factors_give_input_grad(shape, dtype):
    """dX_m = A^T dY_m B, computed by the forward kernel on transposed factor views."""
    m, a1, a2, b1, b2 = shape
    x, a, b = make(shape, dtype)
    dy = torch.randn(m, a1, b1, device=x.device, dtype=dtype)
    dx = kron_rows(dy, a.mT, b.mT, None, 1.0)
    ref = torch.einsum("ij,mik,kl->mjl", a.double(), dy.double(), b.double()).reshape(m, -1)
    assert_close(dx, ref, dtype, "input grad")


@pytest.mark.parametrize("shape", SHAPES + [(300, 4, 4, 16, 16)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kron_factor_grads(shape, dtype):
    """dA = sum dY_m B X_m^T and dB = sum dY_m^T A X_m, the latter via transposed views."""
    m, a1, a2, b1, b2 = shape
    x, a, b = make(shape, dtype)
    dy = torch.randn(m, a1, b1, device=x.device, dtype=dtype)
    grad_a = kron_factor_grad(dy, b, x, 0.5)
    grad_b = kron_factor_grad(dy.mT, a, x.mT)
    xd, dyd = x.double(), dy.double()
    assert grad_a.dtype == dtype and grad_a.shape == (a1, a2)
    assert_close(grad_a, 0.5 * torch.einsum("mik,kl,mjl->ij", dyd, b.double(), xd), dtype, "dA")
    assert_close(grad_b, torch.einsum("mik,ij,mjl->kl", dyd, a.double(), xd), dtype, "dB")


FP16_MAX = torch.finfo(torch.float16).max


def spread(shape, scale):
    """fp16 values of magnitude ~``scale`` on KERNEL_DEVICE."""
    return (scale * torch.randn(shape, dtype=torch.float64)).to(KERNEL_DEVICE, torch.float16)


@pytest.mark.parametrize("shape", [(2, 4, 3, 2, 5), (5, 20, 70, 33, 9)])
@pytest.mark.parametrize("product", ["forward", "dx", "da", "db"])
def test_fp16_intermediate_beyond_fp16_range(shape, product):
    """Two factors of ~300 and one of ~1e-3: the intermediate each kernel forms (X Bᵀ, dY B,
    X Bᵀ, A X) reaches ~1e5 > 65504 while the product stays ~1e2-1e4. The kernels must
    give it within fp16's tolerance of the fp64 product, not inf."""
    m, a1, a2, b1, b2 = shape
    big, small = 300.0, 1e-3
    scales = dict(forward=(big, small, big, 1.0), dx=(1.0, small, big, big),
                  da=(big, 1.0, big, small), db=(big, big, 1.0, small))[product]
    x, a, b, dy = (spread(s, k) for s, k in
                   zip([(m, a2, b2), (a1, a2), (b1, b2), (m, a1, b1)], scales))
    xd, ad, bd, dyd = x.double(), a.double(), b.double(), dy.double()
    if product == "forward":
        inner, out = xd @ bd.T, kron_rows(x, a, b)
        ref = torch.einsum("ij,mjl,kl->mik", ad, xd, bd).reshape(m, -1)
    elif product == "dx":
        inner, out = dyd @ bd, kron_rows(dy, a.mT, b.mT)
        ref = torch.einsum("ij,mik,kl->mjl", ad, dyd, bd).reshape(m, -1)
    elif product == "da":
        inner, out = xd @ bd.T, kron_factor_grad(dy, b, x)
        ref = torch.einsum("mik,kl,mjl->ij", dyd, bd, xd)
    else:
        inner, out = ad @ xd, kron_factor_grad(dy.mT, a, x.mT)
        ref = torch.einsum("mik,ij,mjl->kl", dyd, ad, xd)
    assert inner.abs().max() > FP16_MAX > ref.abs().max()
    assert_close(out, ref, torch.float16, product)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another")
def test_factor_grad_is_deterministic():
    x, a, b = make((257, 8, 8, 8, 8), torch.float32)
    dy = torch.randn(257, 8, 8, device=x.device)
    first = kron_factor_grad(dy, b, x)
    assert torch.equal(first, kron_factor_grad(dy, b, x))


def test_empty_batch():
    x, a, b = make((0, 3, 4, 5, 6), torch.float32)
    assert kron_rows(x, a, b, None, 1.0).shape == (0, 15)
    assert torch.equal(kron_factor_grad(torch.empty(0, 3, 5, device=x.device), b, x),
                       torch.zeros(3, 4, device=x.device))


def test_nan_propagates():
    x, a, b = make((4, 4, 4, 4, 4), torch.float32)
    x = x.clone()
    x[1, 2, 3] = float("nan")
    y = kron_rows(x, a, b, None, 1.0)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any()


def test_strided_bias():
    x, a, b = make((5, 3, 4, 2, 3), torch.float32)
    bias = torch.randn(12, device=x.device)[::2]
    y = kron_rows(x, a, b, bias, 1.0)
    ref = x.double().reshape(5, -1) @ torch.kron(a.double(), b.double()).T + bias.double()
    assert_close(y, ref, torch.float32, "strided bias")


def test_int32_rows_copies_only_when_offsets_overflow():
    int32_rows = importlib.import_module("kronops.kernels.kron.tiles").int32_rows
    small = torch.randn(4, 8, 3).transpose(1, 2)
    assert int32_rows(small) is small
    huge = torch.empty_strided((2, 3, 4), (1, 2, 2 ** 30), device="meta")  # x.T-like rows
    assert int32_rows(huge).is_contiguous()
