"""The one-pass Kronecker backward kernel (kronops/kernels/kron/rows_grads.py) against the fp64
reference: every subset of gradients, odd and padded factor shapes, strided dY and x,
transposed factors, row counts that leave programs idle, an empty batch, fp16 intermediates
beyond fp16's range; bitwise reproducible; and the three-kernel path where it does not fit."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, assert_close

from kronops.kernels.kron.rows_grads import fits, launches, triton_kron_rows_grads_one_pass
from kronops.kron.ops import kron_rows_grads
from kronops.kron.torch_kernels import kron_rows_grads as torch_kron_rows_grads

SHAPES = [(3, 4, 6, 2), (16, 16, 16, 16), (5, 17, 2, 9), (32, 16, 48, 24)]


def operands(m, a1, a2, b1, b2, dtype, strided=False):
    def make(*shape):
        return torch.randn(*shape, device=KERNEL_DEVICE, dtype=torch.float32).to(dtype)
    if strided:   # dY rows transposed in memory, x a slice of wider rows
        dy = make(m, b1, a1).mT
        x = make(m, a2, b2 + 3)[:, :, 2:-1]
    else:
        dy, x = make(m, a1, b1), make(m, a2, b2)
    return dy, x, make(a1, a2), make(b1, b2)


def reference(dy, x, a, b, scale):
    return torch_kron_rows_grads(dy.double(), x.double(), a.double(), b.double(), scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_all_gradients_match_reference(shape, dtype, strided):
    if not fits(*shape, dtype):
        pytest.skip("does not fit one tile for this dtype: the three-kernel path runs")
    dy, x, a, b = operands(11, *shape, dtype, strided)
    got = triton_kron_rows_grads_one_pass(dy, x, a, b, 0.6, True, True, True)
    for name, g, r in zip(("dX", "dA", "dB"), got, reference(dy, x, a, b, 0.6)):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("need", ["x", "a", "b", "xa", "xb", "ab"])
def test_each_subset(need):
    dy, x, a, b = operands(7, 3, 4, 6, 2, torch.float32)
    got = triton_kron_rows_grads_one_pass(dy, x, a, b, 1.3, "x" in need, "a" in need, "b" in need)
    for name, g, r in zip("xab", got, reference(dy, x, a, b, 1.3)):
        if name in need:
            assert_close(g, r, torch.float32, name)
        else:
            assert g.numel() == 0


@pytest.mark.parametrize("need_x", [True, False])
def test_two_passes_where_one_exceeds_the_register_budget(need_x):
    """64⁴ in 16-bit: dX with dB, then dA, each pass reading x and dY once."""
    plan = launches(64, 64, 64, 64, 2, "tf32", need_x, True, True)
    assert len(plan) == (2 if need_x else 1)
    assert launches(32, 32, 32, 32, 2, "tf32", True, True, True) == [
        dict(NEED_X=True, NEED_A=True, NEED_B=True)]
    dy, x, a, b = operands(5, 64, 64, 64, 64, torch.float16)
    got = triton_kron_rows_grads_one_pass(dy, x, a, b, 0.25, need_x, True, True)
    for name, g, r in zip("xab", got, reference(dy, x, a, b, 0.25)):
        if name != "x" or need_x:
            assert_close(g, r, torch.float16, name)


def test_transposed_factors_and_few_rows():
    """Factor views with swapped strides; fewer rows than programs (idle programs write
    zero partials)."""
    a, b = torch.randn(5, 3, device=KERNEL_DEVICE).mT, torch.randn(7, 4, device=KERNEL_DEVICE).mT
    for m in (1, 2):
        dy = torch.randn(m, 3, 4, device=KERNEL_DEVICE)
        x = torch.randn(m, 5, 7, device=KERNEL_DEVICE)
        got = triton_kron_rows_grads_one_pass(dy, x, a, b, 0.5, True, True, True)
        for name, g, r in zip("xab", got, reference(dy, x, a, b, 0.5)):
            assert_close(g, r, torch.float32, name)


def test_empty_batch():
    dy, x, a, b = operands(0, 3, 4, 6, 2, torch.float32)
    dx, da, db = triton_kron_rows_grads_one_pass(dy, x, a, b, 1.0, True, True, True)
    assert dx.shape == (0, 4, 2) and not da.any() and not db.any()
    assert da.shape == (3, 4) and db.shape == (6, 2)


def test_bitwise_reproducible():
    dy, x, a, b = operands(37, 16, 16, 16, 16, torch.float32)
    first = triton_kron_rows_grads_one_pass(dy, x, a, b, 0.7, True, True, True)
    second = triton_kron_rows_grads_one_pass(dy, x, a, b, 0.7, True, True, True)
    for f, s in zip(first, second):
        assert torch.equal(f, s)


def test_fp16_intermediate_beyond_fp16_range():
    """A^T dY near 1e5 (fp16 overflows at 65504) while every gradient stays within range
    (dX ~ 1e2, dB ~ 1e4, dA ~ 1e-1): the intermediates stay in fp32 (tf32 second products)."""
    m, a1, a2, b1, b2 = 6, 3, 4, 5, 2
    dy = (300 * torch.randn(m, a1, b1, device=KERNEL_DEVICE)).half()
    x = (1e-2 * torch.randn(m, a2, b2, device=KERNEL_DEVICE)).half()
    a = (300 * torch.randn(a1, a2, device=KERNEL_DEVICE)).half()
    b = (1e-3 * torch.randn(b1, b2, device=KERNEL_DEVICE)).half()
    got = triton_kron_rows_grads_one_pass(dy, x, a, b, 1.0, True, True, True)
    for name, g, r in zip("xab", got, reference(dy, x, a, b, 1.0)):
        assert torch.isfinite(g).all(), name
        assert_close(g, r, torch.float16, name)


def test_op_takes_the_three_kernels_where_factors_do_not_fit(triton_backend):
    """33 rows of A exceed the 32-wide ieee fp32 tile: kron_rows_grads still matches."""
    assert not fits(33, 2, 3, 5, torch.float32)
    dy, x, a, b = operands(4, 33, 2, 3, 5, torch.float32)
    got = kron_rows_grads(dy, x, a, b, 0.9, True, True, True)
    for name, g, r in zip("xab", got, reference(dy, x, a, b, 0.9)):
        assert_close(g.reshape(r.shape), r, torch.float32, name)
