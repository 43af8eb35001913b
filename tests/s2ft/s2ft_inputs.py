"""Inputs for the S²FT linear op in every selection mode, and the check of its outputs and
gradients against a float64 reference."""
import torch
from conftest import assert_close

from kronops.s2ft.ops import sparse_linear
from kronops.testing import naive_sparse_linear


def selection(kind: str, total: int, count: int, device):
    if kind == "tensor":
        return torch.randperm(total, device=device)[:count].sort().values
    start = int(torch.randint(0, total - count + 1, ()))
    return slice(start, start + count) if kind == "slice" else range(start, start + count)


def inputs(lead, out, inp, count, mode, kind, dtype, device="cpu"):
    kw = dict(device=device, dtype=dtype)
    count = min(count, out if mode == "rows" else inp)
    x = torch.randn(*lead, inp + 3, **kw)[..., 2:-1]  # a non-contiguous view
    weight, bias = torch.randn(out, inp, **kw), torch.randn(out, **kw)
    sel = selection(kind, out if mode == "rows" else inp, count, device)
    delta = torch.randn(*((count, inp) if mode == "rows" else (out, count)), **kw)
    for t in (x, delta, bias):
        t.requires_grad_()
    return x, weight, delta, bias, {mode: sel}


def check_against_reference(x, weight, delta, bias, sel, dtype):
    y = sparse_linear(x, weight, delta, bias=bias, **sel)
    leaves = [x, delta, bias]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_sel = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in sel.items()}
    ref = naive_sparse_linear(ref_leaves[0].cpu(), weight.double().cpu(),
                                  ref_leaves[1].cpu(), bias=ref_leaves[2].cpu(), **ref_sel)
    assert y.shape == ref.shape and y.dtype == dtype
    # The bias may cancel the product: measure the error against the size of both terms.
    product = naive_sparse_linear(ref_leaves[0].cpu(), weight.double().cpu(),
                                      ref_leaves[1].cpu(), **ref_sel)
    rows = product.numel() // product.shape[-1]
    assert_close(y, ref, dtype, "forward",
                 magnitude=(product.norm() + ref_leaves[2].norm() * rows ** 0.5).item())
    grad = torch.randn_like(ref)
    y.backward(grad.to(y.device, dtype))
    ref.backward(grad)
    for name, t, r in zip(["x", "delta", "bias"], leaves, ref_leaves):
        assert_close(t.grad, r.grad, dtype, f"grad {name}")
    assert weight.grad is None
