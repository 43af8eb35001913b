"""S²FT index safety: whatever an index tensor or a range start holds, no kernel reads or
writes outside its tensors; compiled graphs (which skip the host-side index checks) stay
memory-safe; and a layer refuses a bad selection when its state is loaded."""
import pytest
import torch
from conftest import ON_GPU, assert_close
from guarded import SENTINEL, Guarded

import kronops
from kronops.kernels.s2ft.adamw import launch_sparse_adamw
from kronops.kernels.s2ft.delta_grad import launch_sparse_delta_grad
from kronops.kernels.s2ft.matmul_add import triton_sparse_matmul_add
from kronops.testing import naive_sparse_linear

BAD = [-7, 2, 5, 10 ** 6]  # two valid positions between out-of-range ones


def bad_selection(kind: str, size: int):
    """(what a launcher takes, the 4 positions it names) in a dimension of ``size``: the
    index tensor BAD, or a range starting 2 before the first position or 2 before the end."""
    if kind == "index":
        return torch.tensor(BAD), torch.tensor(BAD)
    start = -2 if kind == "range-before" else size - 2
    return start, torch.arange(start, start + 4)


KINDS = ["index", "range-before", "range-after"]


@pytest.mark.skipif(ON_GPU, reason="guard regions are checked through the interpreter")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["gather", "scatter"])
def test_matmul_add_skips_out_of_range_positions(side, kind):
    m, cols, k, n = 9, 12, 4, 4
    a, out, b = Guarded(m, cols if side == "gather" else k), \
        Guarded(m, n if side == "gather" else cols, SENTINEL), Guarded(n, k)
    sel, positions = bad_selection(kind, cols)
    valid = (positions >= 0) & (positions < cols)
    ref = out.view.double().clone()
    if side == "gather":  # out += a[:, I] bᵀ over the valid I only
        ref += a.view.double()[:, positions[valid]] @ b.view.double()[:, valid].T
        triton_sparse_matmul_add(out.view, a.view, b.view, a_cols=sel)
    else:  # out[:, J] += a bᵀ for the valid J only
        ref[:, positions[valid]] += a.view.double() @ b.view.double()[valid].T
        triton_sparse_matmul_add(out.view, a.view, b.view, out_cols=sel)
    assert_close(out.view, ref, torch.float32, "matmul_add", magnitude=ref.norm().item())
    assert a.guard_intact() and out.guard_intact() and b.guard_intact()


@pytest.mark.skipif(ON_GPU, reason="guard regions are checked through the interpreter")
@pytest.mark.parametrize("kind", KINDS)
def test_delta_grad_and_adamw_skip_out_of_range_positions(kind):
    d, x = Guarded(20, 9), Guarded(20, 6)
    sel, positions = bad_selection(kind, 9)
    valid = (positions >= 0) & (positions < 9)
    g = launch_sparse_delta_grad(d.view, x.view, d_cols=sel, p=4, q=6)
    assert_close(g[valid], d.view.double()[:, positions[valid]].T @ x.view.double(),
                 torch.float32, "dΔ")
    assert torch.equal(g[~valid], torch.zeros(int((~valid).sum()), 6))
    assert d.guard_intact() and x.guard_intact()
    weight = Guarded(9, 5, SENTINEL)
    before = weight.view.clone()
    state = torch.zeros(2, 4, 5)
    launch_sparse_adamw(weight.view, torch.ones(4, 5), state[0], state[1], None, sel,
                                False, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                step=1)
    moved = (weight.view != before).any(1)
    assert moved.tolist() == [i in positions[valid] for i in range(9)] and weight.guard_intact()


@pytest.mark.skipif(not ON_GPU, reason="index values on the host are checked by every kernel "
                                        "(test_op_validation); on CUDA they are not read")
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_compiled_graph_with_a_bad_index_is_memory_safe(mode, triton_backend):
    """torch.compile skips the host checks (they would sync), and the Triton kernels do not
    read a CUDA index on the host: they skip the out-of-range positions."""
    torch._dynamo.reset()
    x, weight = torch.randn(5, 8, device="cuda"), torch.randn(6, 8, device="cuda")
    index = torch.tensor([1, 3, 99], device="cuda")
    delta = torch.randn((3, 8) if mode == "rows" else (6, 3), device="cuda")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, delta, index):
        return kronops.sparse_linear(x, weight, delta, **{mode: index})

    y = f(x, delta, index)
    valid = {mode: index[:2]}
    part = delta[:2] if mode == "rows" else delta[:, :2]
    assert_close(y, naive_sparse_linear(x, weight, part, **valid),
                 torch.float32, "valid positions")


@pytest.mark.parametrize("bad", [[0, 4, 4], [4, 0, 2], [0, 2, 99], [0, 1]],
                         ids=["repeated", "unsorted", "out-of-range", "wrong-length"])
@pytest.mark.parametrize("cls", [kronops.S2FTLinear, kronops.S2FTInPlaceLinear])
def test_load_state_dict_refuses_a_bad_selection(bad, cls):
    layer = cls(torch.nn.Linear(8, 6), rows=torch.tensor([0, 2, 4]))
    state = layer.state_dict()
    state["index"] = torch.tensor(bad)
    before = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="bad S²FT selection index"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
