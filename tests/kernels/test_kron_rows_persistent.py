"""The persistent Kronecker forward kernel (kronops/kernels/kron/rows_persistent.py) against the fp64
reference: padded and odd factor shapes, bias, strided rows, transposed factors, row counts
that leave the last block part-filled or programs idle, an empty batch, fp16 intermediates
beyond fp16's range; and ``kron_linear`` routed to it when the rule is pinned on."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, assert_close

import kronops
from kronops.kernels.kron.rows_persistent import fits, triton_kron_rows_persistent
from kronops.kernels.kron import rows
from kronops.kron import dispatch
from kronops.kron.torch_kernels import kron_rows as torch_kron_rows
from kronops.testing import naive_kron_linear

SHAPES = [(3, 4, 6, 2), (16, 16, 16, 16), (5, 17, 2, 9), (32, 16, 32, 24)]


def reference(x, a, b, bias, scale):
    return torch_kron_rows(x.double(), a.double(), b.double(),
                           None if bias is None else bias.double(), scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("rows", [1, 9, 37])
def test_matches_reference(shape, dtype, rows):
    a1, a2, b1, b2 = shape
    if not fits(*shape, dtype):
        pytest.skip("a factor exceeds its tile for this dtype")
    x = torch.randn(rows, a2, b2 + 3, device=KERNEL_DEVICE)[:, :, 1:-2].to(dtype)  # strided
    a = torch.randn(a1, a2, device=KERNEL_DEVICE).to(dtype)
    b = torch.randn(b1, b2, device=KERNEL_DEVICE).to(dtype)
    bias = torch.randn(a1 * b1, device=KERNEL_DEVICE).to(dtype)
    for with_bias in (False, True):
        got = triton_kron_rows_persistent(x, a, b, bias if with_bias else None, 0.6)
        assert got.shape == (rows, a1 * b1) and got.dtype == dtype
        assert_close(got, reference(x, a, b, bias if with_bias else None, 0.6), dtype)


def test_transposed_factors_and_empty_batch():
    a = torch.randn(5, 3, device=KERNEL_DEVICE).mT
    b = torch.randn(7, 4, device=KERNEL_DEVICE).mT
    x = torch.randn(6, 5, 7, device=KERNEL_DEVICE)
    assert_close(triton_kron_rows_persistent(x, a, b, None, 1.5), reference(x, a, b, None, 1.5),
                 torch.float32)
    assert triton_kron_rows_persistent(x[:0], a, b).shape == (0, 12)


def test_fp16_intermediate_beyond_fp16_range():
    """X B^T near 1e5 while Y stays near 1e2: T is kept in fp32 (tf32 second product)."""
    x = (300 * torch.randn(7, 4, 5, device=KERNEL_DEVICE)).half()
    b = (300 * torch.randn(6, 5, device=KERNEL_DEVICE)).half()
    a = (1e-3 * torch.randn(3, 4, device=KERNEL_DEVICE)).half()
    got = triton_kron_rows_persistent(x, a, b)
    assert torch.isfinite(got).all()
    assert_close(got, reference(x, a, b, None, 1.0), torch.float16)


def test_kron_linear_takes_it_when_pinned(triton_backend, monkeypatch):
    used = []
    launcher = rows.rows_persistent.triton_kron_rows_persistent
    monkeypatch.setattr(rows.rows_persistent, "triton_kron_rows_persistent",
                        lambda *args: used.append(1) or launcher(*args))
    x = torch.randn(2, 5, 24, device=KERNEL_DEVICE)
    a, b = torch.randn(4, 6, device=KERNEL_DEVICE), torch.randn(3, 4, device=KERNEL_DEVICE)
    kronops.kron_linear(x, a, b)
    assert used == []                                   # opt-in until measured
    with dispatch.override(persistent=True):
        y = kronops.kron_linear(x, a, b, scale=0.5)
    assert used == [1]
    assert_close(y, naive_kron_linear(x.double(), a.double(), b.double(), scale=0.5),
                 torch.float32)
