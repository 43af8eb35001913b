"""Every tuning config of every kernel, one at a time, at sizes that are not multiples of any
block, with every operand inside a NaN guard region.

The interpreter runs only the first viable config, and a GPU picks its own, so each config
is forced here (a one-config autotuner runs it as is). Operands are views into padded
buffers: inputs padded with NaN on every side (and index tensors followed by -1, which
points into the padding), so a read outside an input makes the result NaN; tensors
updated in place padded with a finite sentinel, which any write outside them changes.
Both fail an assertion instead of passing silently or crashing the interpreter.
"""
import pytest
import torch
from conftest import ON_GPU, assert_close
from guarded import SENTINEL, Guarded

from kronops.kernels.kron import factor_grad, rows
from kronops.kernels.s2ft import adamw, delta_grad, matmul_add

pytestmark = pytest.mark.skipif(ON_GPU, reason="forces configs through the interpreter")


@pytest.fixture(autouse=True)
def guarded_partials(monkeypatch):
    """The gradient kernels' fp32 partials, allocated inside sentinel-padded buffers; every
    one of them is checked after the test."""
    made = []

    def new_partials(groups, p, q, device):
        buffer = torch.full((groups, p + 2, q + 4), SENTINEL, device=device)
        made.append((buffer, (slice(None), slice(1, p + 1), slice(2, q + 2))))
        return buffer[made[-1][1]]

    for module in (factor_grad, delta_grad):
        monkeypatch.setattr(module, "new_partials", new_partials)
    yield
    for buffer, inside in made:
        padding = buffer.clone()
        padding[inside] = SENTINEL
        assert bool((padding == SENTINEL).all()), "a gradient kernel wrote outside its partial"


def guarded_index(values: list[int]) -> torch.Tensor:
    """An int64 index tensor followed in memory by -1 (a column of the NaN padding)."""
    return torch.tensor(values + [-1], dtype=torch.int64)[:-1]


def selection(gather: bool, values: list[int], start: int, count: int):
    """(what a launcher takes, the positions as a tensor): a guarded index tensor of
    ``values`` when ``gather``, else the start of ``count`` positions."""
    if gather:
        return guarded_index(values), torch.tensor(values)
    return start, torch.arange(start, start + count)


def each_config(module):
    """Parameters for the ``forced`` fixture: (kernel module, config index) for every config."""
    return [pytest.param((module, i), id=f"{module.__name__.rsplit('.', 1)[1]}-cfg{i}")
            for i in range(len(module.CONFIGS))]


@pytest.fixture
def forced(request, monkeypatch):
    """The autotuner of the kernel module given left with only the config given: it runs it."""
    module, i = request.param
    monkeypatch.setattr(module.tuned, "configs", [module.CONFIGS[i]])


def check_kron_rows(m, a1, a2, b1, b2):
    """kron_rows on guarded operands against the fp64 product; returns the operands."""
    x = Guarded(m, a2 * b2)
    a, b = Guarded(a1, a2), Guarded(b1, b2)
    y = rows.launch_kron_rows(x.view.view(m, a2, b2), a.view, b.view, None, 0.5)
    ref = 0.5 * x.view.double() @ torch.kron(a.view.double(), b.view.double()).T
    assert_close(y, ref, torch.float32, "kron_rows")
    return x, a, b


@pytest.mark.parametrize("forced", each_config(rows), indirect=True)
def test_kron_rows_config(forced):
    x, a, b = check_kron_rows(37, 5, 7, 9, 3)
    assert x.guard_intact() and a.guard_intact() and b.guard_intact()


def test_kron_rows_several_output_tiles_each_way():
    """A 1-D grid, output tile fastest: 2 x 2 output tiles (ieee fp32 tiles stop at 32) for
    each of 5 row blocks land where they belong, and nothing outside y is written."""
    check_kron_rows(5, 40, 3, 33, 4)


@pytest.mark.parametrize("forced", each_config(factor_grad), indirect=True)
def test_kron_factor_grad_config(forced):
    m, a1, a2, b1, b2 = 37, 5, 7, 9, 3
    dy, b, x = Guarded(m, a1 * b1), Guarded(b1, b2), Guarded(m, a2 * b2)
    g = factor_grad.triton_kron_factor_grad(dy.view.view(m, a1, b1), b.view,
                                        x.view.view(m, a2, b2), 2.0)
    ref = 2.0 * torch.einsum("mik,kl,mjl->ij", dy.view.double().view(m, a1, b1),
                             b.view.double(), x.view.double().view(m, a2, b2))
    assert_close(g, ref, torch.float32, "kron_factor_grad")
    assert dy.guard_intact() and b.guard_intact() and x.guard_intact()


@pytest.mark.parametrize("gather,scatter", [(True, True), (False, False)])
@pytest.mark.parametrize("forced", each_config(matmul_add), indirect=True)
def test_sparse_matmul_add_config(forced, gather, scatter):
    m, a_cols, out_cols, k, n = 37, 61, 150, 29, 70  # several row and column tiles
    a, out, b = Guarded(m, a_cols), Guarded(m, out_cols, SENTINEL), Guarded(n, k)
    a_sel, i_idx = selection(gather, list(range(1, 2 * k, 2)), 3, k)
    out_sel, j_idx = selection(scatter, list(range(0, 2 * n, 2)), 4, n)
    ref = out.view.double().clone()
    ref[:, j_idx] += a.view.double()[:, i_idx] @ b.view.double().T
    matmul_add.triton_sparse_matmul_add(out.view, a.view, b.view, a_cols=a_sel, out_cols=out_sel)
    assert_close(out.view, ref, torch.float32, "sparse_matmul_add",
                 magnitude=ref.norm().item() + out.view.double().norm().item())
    assert a.guard_intact() and out.guard_intact() and b.guard_intact()


@pytest.mark.parametrize("gather_d,gather_x", [(True, True), (False, False)])
@pytest.mark.parametrize("forced", each_config(delta_grad), indirect=True)
def test_sparse_delta_grad_config(forced, gather_d, gather_x):
    m, d_cols, x_cols, p, q = 70, 40, 35, 17, 11
    d, x = Guarded(m, d_cols), Guarded(m, x_cols)
    d_sel, i_idx = selection(gather_d, list(range(2, 2 + 2 * p, 2)), 5, p)
    x_sel, j_idx = selection(gather_x, list(range(1, 1 + 3 * q, 3)), 7, q)
    g = delta_grad.launch_sparse_delta_grad(d.view, x.view, d_cols=d_sel, p=p, x_cols=x_sel, q=q)
    assert_close(g, d.view.double()[:, i_idx].T @ x.view.double()[:, j_idx], torch.float32,
                 "sparse_delta_grad")
    assert d.guard_intact() and x.guard_intact()


@pytest.mark.parametrize("cols", [False, True])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("forced", each_config(adamw), indirect=True)
def test_sparse_adamw_config(forced, cols, gather):
    """One AdamW step from zero state moves each selected entry by lr * g / (|g| + eps) after
    decay; the rest of the weight, and everything outside it, stays as it was."""
    out_features, in_features, count = 23, 97, 11  # 11 * 97 and 23 * 11: odd element counts
    weight = Guarded(out_features, in_features, SENTINEL)
    before = weight.view.clone()
    dim = 1 if cols else 0
    sel, index = selection(gather, list(range(1, 2 * count, 2)), 4, count)
    shape = (out_features, count) if cols else (count, in_features)
    grad = Guarded(*shape)
    state = Guarded(2, shape[0] * shape[1], SENTINEL)  # the moments: two contiguous rows
    state.view.zero_()
    moments = state.buffer[1:3, 2:2 + shape[0] * shape[1]]
    m, v = (t.view(shape) for t in moments)
    adamw.launch_sparse_adamw(weight.view, grad.view, m, v, None, sel, cols, lr=0.1, beta1=0.9,
                                beta2=0.99, eps=1e-8, weight_decay=0.5, step=1)
    part = before.index_select(dim, index).double() * (1 - 0.1 * 0.5)
    g = grad.view.double()
    expected = part - 0.1 * g / (g.abs() + 1e-8)
    assert_close(weight.view.index_select(dim, index), expected, torch.float32, "weight")
    rest = torch.ones(weight.view.shape[dim], dtype=torch.bool)
    rest[index] = False
    assert torch.equal(weight.view.index_select(dim, rest.nonzero().flatten()),
                       before.index_select(dim, rest.nonzero().flatten()))
    assert weight.guard_intact() and grad.guard_intact() and state.guard_intact()
