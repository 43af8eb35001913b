"""The S²FT Triton kernels (interpreter on CPU, compiled on a GPU) vs fp64 references."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, ON_GPU, assert_close

from kronops.kernels.s2ft.delta_grad import launch_sparse_delta_grad as sparse_delta_grad
from kronops.kernels.s2ft.matmul_add import triton_sparse_matmul_add as sparse_matmul_add

# (M, a columns, out columns, K read, N written): odd, prime and tile-spanning shapes.
SHAPES = [(1, 1, 1, 1, 1), (37, 61, 50, 29, 13), (70, 130, 67, 67, 66), (5, 200, 9, 3, 7),
          (129, 40, 150, 17, 131)]


def pick(total: int, count: int, contiguous: bool):
    """A sorted unique index tensor of ``count`` in [0, total), or a range start."""
    if contiguous:
        return int(torch.randint(0, total - count + 1, ()))
    return torch.randperm(total, device=KERNEL_DEVICE)[:count].sort().values


def as_index(sel, count):
    return torch.arange(sel, sel + count, device=KERNEL_DEVICE) if isinstance(sel, int) else sel


def padded(m: int, n: int, dtype):
    """A non-contiguous (m, n) view: rows with padding between them."""
    return torch.randn(m, n + 3, device=KERNEL_DEVICE, dtype=dtype)[:, 2:2 + n]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("gather,scatter", [(True, True), (True, False), (False, True),
                                            (False, False)])
def test_sparse_matmul_add(shape, dtype, gather, scatter):
    m, a_cols, out_cols, k, n = shape
    a, out = padded(m, a_cols, dtype), padded(m, out_cols, dtype)
    b = torch.randn(k, n, device=KERNEL_DEVICE, dtype=dtype).mT  # (N, K), transposed strides
    i, j = pick(a_cols, k, not gather), pick(out_cols, n, not scatter)
    ref = out.double().clone()
    product = a.double()[:, as_index(i, k)] @ b.double().T
    ref[:, as_index(j, n)] += product
    magnitude = (out.double().norm() + product.norm()).item()  # the sum may cancel
    result = sparse_matmul_add(out, a, b, a_cols=i, out_cols=j)
    assert result is out
    assert_close(out, ref, dtype, "sparse_matmul_add", magnitude=magnitude)


@pytest.mark.parametrize("shape", SHAPES + [(1000, 20, 30, 11, 19)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("gather_d,gather_x", [(True, False), (False, True), (True, True),
                                               (False, False)])
def test_sparse_delta_grad(shape, dtype, gather_d, gather_x):
    m, x_cols, d_cols, q, p = shape
    d, x = padded(m, d_cols, dtype), padded(m, x_cols, dtype).T.contiguous().T
    i, j = pick(d_cols, p, not gather_d), pick(x_cols, q, not gather_x)
    g = sparse_delta_grad(d, x, d_cols=i, p=p, x_cols=j, q=q)
    ref = d.double()[:, as_index(i, p)].T @ x.double()[:, as_index(j, q)]
    assert g.dtype == dtype and g.shape == (p, q)
    assert_close(g, ref, dtype, "sparse_delta_grad")


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs programs one after another: "
                                        "scheduling cannot change the result on CPU")
def test_delta_grad_is_deterministic():
    d, x = padded(2000, 40, torch.float32), padded(2000, 30, torch.float32)
    i = pick(40, 17, False)
    first = sparse_delta_grad(d, x, d_cols=i, p=17, q=30)
    assert torch.equal(first, sparse_delta_grad(d, x, d_cols=i, p=17, q=30))


def test_untouched_columns_are_unchanged():
    out = padded(9, 20, torch.float32)
    before = out.clone()
    j = torch.tensor([1, 4, 19], device=KERNEL_DEVICE)
    sparse_matmul_add(out, padded(9, 8, torch.float32), torch.randn(3, 8, device=KERNEL_DEVICE),
                      out_cols=j)
    rest = torch.ones(20, dtype=torch.bool)
    rest[j.cpu()] = False
    assert torch.equal(out[:, rest.to(out.device)], before[:, rest.to(out.device)])


def test_empty_rows():
    out = torch.empty(0, 5, device=KERNEL_DEVICE)
    assert sparse_matmul_add(out, torch.empty(0, 4, device=KERNEL_DEVICE),
                             torch.randn(5, 4, device=KERNEL_DEVICE)).shape == (0, 5)
    g = sparse_delta_grad(torch.empty(0, 5, device=KERNEL_DEVICE),
                          torch.empty(0, 4, device=KERNEL_DEVICE), d_cols=1, p=3, q=4)
    assert torch.equal(g, torch.zeros(3, 4, device=KERNEL_DEVICE))


def test_nan_propagates():
    a = padded(8, 6, torch.float32)
    a[3, 2] = float("nan")
    out = torch.zeros(8, 4, device=KERNEL_DEVICE)
    sparse_matmul_add(out, a, torch.randn(4, 6, device=KERNEL_DEVICE))
    assert torch.isnan(out[3]).all() and not torch.isnan(out[[0, 1, 2, 4]]).any()


def test_strided_index_tensors():
    """Sorted index tensors that are strided views (not contiguous) gather the right columns."""
    i = torch.arange(24, device=KERNEL_DEVICE)[::2][:5]  # 0, 2, ..., 8 with stride 2
    j = torch.arange(30, device=KERNEL_DEVICE)[1::3][:4]
    assert not i.is_contiguous() and not j.is_contiguous()
    a, out = padded(7, 12, torch.float32), padded(7, 11, torch.float32)
    b = torch.randn(4, 5, device=KERNEL_DEVICE)
    ref = out.double().clone()
    ref[:, j] += a.double()[:, i] @ b.double().T
    assert_close(sparse_matmul_add(out, a, b, a_cols=i, out_cols=j), ref, torch.float32,
                 "strided indices")
    g = sparse_delta_grad(out, a, d_cols=j, p=4, x_cols=i, q=5)
    assert_close(g, out.double()[:, j].T @ a.double()[:, i], torch.float32, "strided indices")
