"""kronops.kron_linear: every backend vs the materialised reference, autograd, opcheck, compile."""
import pytest
import torch
from conftest import KERNEL_DEVICE, KERNEL_DTYPES, ON_GPU, TOLERANCE, assert_close, rel_err

import kronops
from kronops.testing import naive_kron_linear

# (leading dims of x, a shape, b shape)
CASES = [((), (3, 5), (7, 11)), ((9,), (16, 16), (16, 16)), ((2, 5), (4, 6), (5, 3)),
         ((4, 3), (1, 7), (13, 1)), ((6,), (33, 2), (3, 19))]


def inputs(lead, a_shape, b_shape, dtype, device="cpu", requires_grad=False):
    kw = dict(device=device, dtype=dtype)
    k = a_shape[1] * b_shape[1]
    x = torch.randn(*lead, k + 2, **kw)[..., 1:-1]  # a non-contiguous view
    a, b = torch.randn(*a_shape, **kw), torch.randn(*b_shape, **kw)
    bias = torch.randn(a_shape[0] * b_shape[0], **kw)
    for t in (x, a, b, bias):
        t.requires_grad_(requires_grad)
    return x, a, b, bias


def check_against_reference(x, a, b, bias, dtype, scale=0.5):
    y = kronops.kron_linear(x, a, b, bias, scale=scale)
    leaves = [x, a, b, bias]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = naive_kron_linear(*ref_leaves, scale=scale)
    assert y.shape == ref.shape and y.dtype == dtype
    # The bias may cancel the product: measure the error against the size of both terms.
    product = naive_kron_linear(*ref_leaves[:3], scale=scale)
    rows = product.numel() // product.shape[-1]
    assert_close(y, ref, dtype, "forward",
                 magnitude=(product.norm() + ref_leaves[3].norm() * rows ** 0.5).item())
    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    for name, t, r in zip(["x", "a", "b", "bias"], leaves, ref_leaves):
        assert_close(t.grad, r.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("lead,a_shape,b_shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composite_matches_reference(lead, a_shape, b_shape, dtype):
    check_against_reference(*inputs(lead, a_shape, b_shape, dtype, requires_grad=True), dtype)


@pytest.mark.parametrize("lead,a_shape,b_shape", CASES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_matches_reference(lead, a_shape, b_shape, dtype, triton_backend):
    check_against_reference(
        *inputs(lead, a_shape, b_shape, dtype, KERNEL_DEVICE, requires_grad=True), dtype)


def test_1d_input_and_no_bias():
    x, a, b, _ = inputs((), (2, 3), (4, 5), torch.float64)
    assert x.dim() == 1
    y = kronops.kron_linear(x, a, b)
    assert y.shape == (8,)
    assert rel_err(y, naive_kron_linear(x, a, b)) < TOLERANCE[torch.float64]


def test_empty_batch_returns_empty():
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(4, 5)
    y = kronops.kron_linear(torch.randn(0, 3, 15), a, b)
    assert y.shape == (0, 3, 8)
    y.sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


def test_nan_and_inf_propagate_like_reference():
    x, a, b, _ = inputs((3,), (2, 2), (2, 2), torch.float32)
    x = x.clone()
    x[0, 0], x[1, 1] = float("nan"), float("inf")
    y, ref = kronops.kron_linear(x, a, b), naive_kron_linear(x, a, b)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


def test_gradcheck_float64():
    x, a, b, bias = inputs((2, 3), (2, 3), (3, 2), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: kronops.kron_linear(*t, scale=1.3), (x, a, b, bias))
    assert torch.autograd.gradgradcheck(lambda *t: kronops.kron_linear(*t), (x, a, b, bias))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, backend_device):
    x, a, b, bias = inputs((5,), (3, 4), (2, 5), torch.float32, backend_device,
                           requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.kronops.kron_rows.default, (x.reshape(5, 4, 5), a, b, bias, 0.5))
    dy = torch.randn(5, 3, 2, device=backend_device)
    torch.library.opcheck(torch.ops.kronops.kron_factor_grad.default, (dy, b, x.reshape(5, 4, 5), 0.5))


@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if ON_GPU else []))
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = KERNEL_DEVICE if backend == "inductor" else "cpu"
    x, a, b, bias = inputs((4, 3), (3, 4), (2, 5), torch.float32, device, requires_grad=True)

    def step(x, a, b, bias):
        return (kronops.kron_linear(x, a, b, bias, scale=2.0) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(x, a, b, bias)
    grads = torch.autograd.grad(loss, (x, a, b, bias))
    loss_ref = step(x, a, b, bias)
    grads_ref = torch.autograd.grad(loss_ref, (x, a, b, bias))
    assert torch.allclose(loss, loss_ref, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) < 1e-5


BAD = [
    (lambda x, a, b: (x[..., :-1], a, b, None), ValueError, "last dim a2\\*b2 = 12"),
    (lambda x, a, b: (x, a[0], b, None), ValueError, "a must be 2-D"),
    (lambda x, a, b: (x, a, b[None], None), ValueError, "b must be 2-D"),
    (lambda x, a, b: (x, a.double(), b, None), TypeError, "a has dtype torch.float64"),
    (lambda x, a, b: (x, a, b.to("meta"), None), ValueError, "b is on meta"),
    (lambda x, a, b: (x.long(), a, b, None), TypeError, "x must be a floating-point"),
    (lambda x, a, b: (x.numpy(), a, b, None), TypeError, "x must be a torch.Tensor"),
    (lambda x, a, b: (x, a, b, torch.randn(7)), ValueError, "bias must have length a1\\*b1 = 6"),
    (lambda x, a, b: (x, a, b, torch.randn(2, 3)), ValueError, "bias must be 1-D"),
    (lambda x, a, b: (x[:, :0], a[:, :0], b, None), ValueError,
     r"a must have no zero-size dimension, got shape \(2, 0\)"),
]


@pytest.mark.parametrize("make_args,error,match", BAD)
def test_bad_input(make_args, error, match):
    x, a, b = torch.randn(5, 12), torch.randn(2, 3), torch.randn(3, 4)
    with pytest.raises(error, match=match):
        kronops.kron_linear(*make_args(x, a, b))


def test_bad_scale():
    with pytest.raises(TypeError, match=r"scale must be a number, got tensor\(1\.\)"):
        kronops.kron_linear(torch.randn(2, 4), torch.randn(2, 2), torch.randn(2, 2),
                            scale=torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_like_linear(dtype):
    x, a, b, bias = inputs((4, 3), (3, 4), (2, 5), torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = kronops.kron_linear(x, a, b, bias)
        compiled = torch.compile(lambda *t: kronops.kron_linear(*t), fullgraph=True,
                                 backend="aot_eager")(x, a, b, bias)
        z = kronops.kron_matmul(x, [a, b])
    assert y.dtype == compiled.dtype == z.dtype == dtype
    assert rel_err(y, naive_kron_linear(x, a, b, bias)) < 2e-2
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()


def test_pytorch_kernel_does_not_overflow_in_fp16_where_the_product_does_not():
    """X·Bᵀ of these rows is ~4.5e5, past fp16's 65504, while x @ kron(a, b).T is ~1.4e3: the
    PyTorch kernel keeps the intermediate in fp32 (the materialised product never forms it)."""
    x, b = 300 + torch.randn(2, 15), 300 + torch.randn(2, 5)
    a = 1e-3 * (1 + 0.1 * torch.randn(4, 3))
    assert (x.view(2, 3, 5) @ b.T).abs().min() > 65504
    y = kronops.kron_linear(x.half(), a.half(), b.half())
    assert_close(y, naive_kron_linear(x.double(), a.double(), b.double()), torch.float16, "y")


@pytest.mark.parametrize("wanted", ["x", "a", "b", "xa", "ab", "xab"])
def test_backward_computes_only_the_gradients_asked_for(backend_device, wanted):
    """One kron_rows_grads call serves a backward that builds no graph: each subset of
    gradients matches the materialised reference (shared intermediates, folded sums),
    and gradients not asked for are not made."""
    x, a, b, _ = inputs((3, 5), (3, 4), (6, 2), torch.float32, backend_device)
    leaves = dict(x=x, a=a, b=b)
    for name in wanted:
        leaves[name].requires_grad_(True)
    y = kronops.kron_linear(x, a, b, scale=0.7)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [leaves[n] for n in wanted], grad)
    ref64 = {n: t.detach().double().requires_grad_(n in wanted) for n, t in leaves.items()}
    ref = torch.autograd.grad(naive_kron_linear(ref64["x"], ref64["a"], ref64["b"], scale=0.7),
                              [ref64[n] for n in wanted], grad.double())
    assert_close(got, ref, torch.float32, f"gradients of {wanted}")
    for name in "xab":
        assert (leaves[name].grad is None)


def test_kron_rows_grads_leaves_unasked_gradients_empty():
    from kronops.kron.ops import kron_rows_grads
    x, a, b = torch.randn(4, 3, 5), torch.randn(2, 3), torch.randn(6, 5)
    dx, da, db = kron_rows_grads(torch.randn(4, 2, 6), x, a, b, 1.0, False, True, False)
    assert dx.numel() == 0 and db.numel() == 0 and da.shape == (2, 3)
