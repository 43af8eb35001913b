"""kronops.kron_matmul with N = 1, 2, 3, 4 factors vs the materialised reference."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, assert_close

import kronops
from kronops.testing import naive_kron_matmul

FACTORS = [[(5, 7)], [(3, 4), (5, 2)], [(2, 3), (3, 2), (4, 5)], [(2, 2), (1, 3), (3, 2), (2, 3)],
           [(17, 3), (2, 16), (16, 16)]]


def check(shapes, lead, dtype, device):
    kw = dict(device=device, dtype=dtype)
    k = 1
    for _, q in shapes:
        k *= q
    x = torch.randn(*lead, k, **kw).requires_grad_()
    factors = [torch.randn(*s, **kw).requires_grad_() for s in shapes]
    y = kronops.kron_matmul(x, factors, scale=0.3)
    leaves = [x, *factors]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_kron_matmul(ref_leaves[0], ref_leaves[1:], scale=0.3)
    assert y.shape == ref.shape
    assert_close(y, ref, dtype, "forward")
    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    for i, (t, r) in enumerate(zip(leaves, ref_leaves)):
        assert_close(t.grad, r.grad, dtype, f"grad of input {i}")


@pytest.mark.parametrize("shapes", FACTORS)
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_composite(shapes, lead):
    check(shapes, lead, torch.float64, "cpu")


@pytest.mark.parametrize("shapes", FACTORS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton(shapes, dtype, triton_backend):
    check(shapes, (3, 2), dtype, KERNEL_DEVICE)


def test_gradcheck():
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    fs = [torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, *f: kronops.kron_matmul(x, f), (x, *fs))


@pytest.mark.parametrize("factors,error,match", [
    ([], TypeError, "non-empty list"),
    (torch.randn(2, 2), TypeError, "non-empty list"),
    ([torch.randn(2, 2), torch.randn(3)], ValueError, "factors\\[1\\] must be 2-D"),
    ([torch.randn(2, 2), torch.randn(2, 3)], ValueError, "last dim q1\\*...\\*qN = 6"),
    ([torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float64)], TypeError, "factors\\[1\\] has dtype"),
])
def test_bad_input(factors, error, match):
    with pytest.raises(error, match=match):
        kronops.kron_matmul(torch.randn(3, 4), factors)
