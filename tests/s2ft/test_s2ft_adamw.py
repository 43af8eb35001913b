"""The in-place AdamW op on selected rows/columns (its PyTorch kernel and its Triton kernel)
vs torch.optim.AdamW on them, weight decay included."""
import pytest
import torch
from conftest import KERNEL_DEVICE, ON_GPU, assert_close

import kronops
from kronops.kernels.s2ft.adamw import launch_sparse_adamw as sparse_adamw


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,count", [((37, 29), 5), ((130, 67), 64), ((3, 1100), 2)])
def test_matches_torch_adamw(cols, gather, dtype, shape, count, backend_device):
    dim = 1 if cols else 0
    kw = dict(device=backend_device)
    weight = torch.randn(shape[1], shape[0], dtype=dtype, **kw).T  # non-contiguous (out, in)
    if gather:
        sel = torch.randperm(shape[dim], **kw)[:count].sort().values
        index = sel
    else:
        sel = int(torch.randint(0, shape[dim] - count + 1, ()))
        index = torch.arange(sel, sel + count, **kw)
    original = weight.clone()
    part = weight.index_select(dim, index).float().clone().requires_grad_()
    reference = torch.optim.AdamW([part], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    m = torch.zeros(part.shape, **kw)
    v = torch.zeros(part.shape, **kw)
    for step in range(1, 4):
        grad = torch.randn(part.shape, dtype=dtype, **kw)
        part.grad = grad.float()
        reference.step()
        index_arg, start = (sel, 0) if gather else (None, sel)
        torch.ops.kronops.sparse_adamw(weight, grad, m, v, None, index_arg, start, cols, 0.01,
                                       0.8, 0.95, 1e-6, 0.1, step)
        if dtype == torch.float16:  # the weight is stored in fp16 each step: follow it
            with torch.no_grad():
                part.copy_(part.half().float())
    state = reference.state[part]
    assert_close(weight.index_select(dim, index), part, dtype, "weight")
    assert_close(m, state["exp_avg"], torch.float32, "exp_avg")
    assert_close(v, state["exp_avg_sq"], torch.float32, "exp_avg_sq")
    rest = torch.ones(shape[dim], dtype=torch.bool, device=weight.device)
    rest[index] = False
    assert torch.equal(weight.index_select(dim, rest.nonzero().flatten()),
                       original.index_select(dim, rest.nonzero().flatten()))


def test_strided_index_tensor():
    """A strided (non-contiguous) index tensor updates the rows it names."""
    weight = torch.randn(12, 5, device=KERNEL_DEVICE)
    sel = torch.arange(12, device=KERNEL_DEVICE)[::2][:4]
    assert not sel.is_contiguous()
    expected = weight.clone()
    grad = torch.randn(4, 5, device=KERNEL_DEVICE)
    m, v = torch.zeros(4, 5, device=KERNEL_DEVICE), torch.zeros(4, 5, device=KERNEL_DEVICE)
    sparse_adamw(weight, grad, m, v, None, sel, False, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                 weight_decay=0.0, step=1)
    expected[sel] -= 0.1 * grad.sign()  # the first Adam step is lr * sign(grad), up to eps
    assert_close(weight, expected, torch.float32, "weight")


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("master", [False, True])
def test_opcheck(cols, gather, master, backend_device):
    """kronops::sparse_adamw is a registered mutating op: schema, fake impl, compile."""
    kw = dict(device=backend_device)
    weight = torch.randn(12, 10, **kw).to(torch.float16 if master else torch.float32)
    count = 4
    index = torch.tensor([1, 3, 4, 9], **kw) if gather else None
    shape = (12, count) if cols else (count, 10)
    grad, m, v = torch.randn(shape, **kw), torch.zeros(shape, **kw), torch.zeros(shape, **kw)
    values = torch.randn(shape, **kw) if master else None
    torch.library.opcheck(torch.ops.kronops.sparse_adamw.default,
                          (weight, grad, m, v, values, index, 2, cols, 0.1, 0.9, 0.99, 1e-8, 0.01,
                           1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("gather", [False, True])
def test_master_weights_keep_small_updates(dtype, optimizer, gather, backend_device, request):
    """150 steps of lr 1e-4 on weights of 1.0: each update is far below half a bf16/fp16
    rounding step there (2^-9 / 2^-12), so without master values nothing moves; with them
    the low-precision weight is the fp32 run's weight, rounded once. (The interpreter reads
    bf16 tensors wrongly, so without master values bf16 is checked on the PyTorch kernel
    and on a GPU only.)"""
    interpreted_bf16 = dtype == torch.bfloat16 and not ON_GPU and "triton" in request.node.name
    rows = torch.tensor([1, 4, 6], device=backend_device) if gather else range(2, 5)
    make = {"adamw": lambda m, **kw: kronops.InPlaceAdamW(m, lr=1e-4, weight_decay=0.0, **kw),
            "sgd": lambda m, **kw: kronops.InPlaceSGD(m, lr=1e-4, **kw)}[optimizer]
    layers = {}
    runs = [("fp32", torch.float32, {}), ("master", dtype, {})]
    if not interpreted_bf16:
        runs.append(("no master", dtype, dict(master_weights=False)))
    for name, weight_dtype, kw in runs:
        base = torch.nn.Linear(16, 8, device=backend_device).to(weight_dtype)
        with torch.no_grad():
            base.weight.fill_(1.0)
        layer = kronops.S2FTInPlaceLinear(base, rows=rows)
        layers[name] = (layer, make(layer, **kw))
    # one direction (a drift), values exact in the low precision: every run sees the same
    grads = (0.5 + torch.rand(150, 3, 16, device=backend_device)).to(dtype).float()
    for g in grads:
        for layer, opt in layers.values():
            layer.selected.grad = g.to(layer.selected.dtype)
            opt.step()
    part = {name: layer.weight_part() for name, (layer, _) in layers.items()}
    assert (part["fp32"] - 1.0).abs().max() > 0.004  # the fp32 run moved by whole rounding steps
    if interpreted_bf16:  # the interpreter converts to bf16 by truncation: within one step
        assert ((part["master"].float() - part["fp32"]).abs() <= 2.0 ** -8).all()
    else:
        assert torch.equal(part["master"], part["fp32"].to(dtype))
    if not interpreted_bf16:
        assert torch.equal(part["no master"], torch.ones_like(part["no master"]))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("optimizer,name,value,error", [
    *[("adamw", name, value, ValueError) for name in ("lr", "eps", "weight_decay")
      for value in (NAN, INF, -1e-3)],
    *[("adamw", name, value, TypeError) for name in ("lr", "eps", "weight_decay")
      for value in ("1e-3", True, None)],
    ("adamw", "betas", (0.9, NAN), ValueError), ("adamw", "betas", (0.9, 1.0), ValueError),
    ("adamw", "betas", (-0.1, 0.99), ValueError), ("adamw", "betas", (0.9,), ValueError),
    ("adamw", "betas", (0.9, "0.99"), TypeError), ("adamw", "betas", 0.9, TypeError),
    ("sgd", "lr", NAN, ValueError), ("sgd", "lr", -1.0, ValueError),
    ("sgd", "lr", "1e-3", TypeError),
])
def test_optimizers_refuse_bad_hyperparameters(optimizer, name, value, error):
    """As torch.optim.AdamW: a NaN, negative or non-numeric lr, eps or weight_decay and betas
    outside [0, 1) are refused when the optimizer is made, naming the argument (a NaN lr or
    eps used to turn the selected rows NaN at the first step); infinity too."""
    layer = kronops.S2FTInPlaceLinear(torch.nn.Linear(8, 6), rows=torch.tensor([0, 2, 4]))
    cls = {"adamw": kronops.InPlaceAdamW, "sgd": kronops.InPlaceSGD}[optimizer]
    with pytest.raises(error, match=name):
        cls(layer, **{name: value})
