"""The GPU's autotuning branch, taken in the interpreter: benchmarking runs a kernel many
times, so kernels that update tensors in place must come out of it with one update."""
import importlib

import pytest
import torch
from conftest import ON_GPU

import kronops
from kronops.s2ft.modules import S2FTInPlaceLinear

KERNEL_MODULES = ["kron.rows", "kron.rows_persistent", "kron.factor_grad", "kron.rows_grads",
                  "s2ft.matmul_add", "s2ft.delta_grad", "s2ft.adamw"]


@pytest.fixture
def autotuning(monkeypatch, triton_backend):
    """Autotune every viable config (no interpreter shortcut), each kernel's key cache
    empty; the fake benchmark runs each candidate three times."""
    def fake_bench(kernel_call, quantiles=None, **_):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(importlib.import_module("kronops.kernels.launch"), "interpreting",
                        lambda: False)
    for name in KERNEL_MODULES:
        tuned = importlib.import_module(f"kronops.kernels.{name}").tuned
        monkeypatch.setitem(tuned.__dict__, "do_bench", fake_bench)  # a cached_property
        monkeypatch.setattr(tuned, "cache", {})


@pytest.mark.skipif(ON_GPU, reason="fakes the benchmark of the interpreter's autotuning branch")
@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_sparse_linear_adds_once(autotuning, mode):
    x, w = torch.randn(9, 40), torch.randn(24, 40)
    sel = torch.tensor([1, 5, 6, 20])
    delta = torch.randn((4, 40) if mode == "rows" else (24, 4))
    y = kronops.sparse_linear(x, w, delta, **{mode: sel})
    w_full = w.index_add(0 if mode == "rows" else 1, sel, delta)
    torch.testing.assert_close(y, x @ w_full.T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(ON_GPU, reason="fakes the benchmark of the interpreter's autotuning branch")
def test_inplace_adamw_steps_once(autotuning):
    layer = S2FTInPlaceLinear(torch.nn.Linear(40, 24), rows=torch.tensor([0, 3, 7]))
    before = layer.base.weight.detach().clone()
    grad = torch.randn(3, 40)
    layer.selected.grad = grad.clone()
    kronops.s2ft.InPlaceAdamW(layer, lr=0.1, weight_decay=0.0).step()
    # One AdamW step from zero state moves each entry by lr * g / (|g| + eps) ~ lr.
    expected = before[[0, 3, 7]] - 0.1 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(layer.base.weight.detach()[[0, 3, 7]], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(ON_GPU, reason="fakes the benchmark of the interpreter's autotuning branch")
@pytest.mark.parametrize("persistent", [False, True])
def test_kron_linear_under_autotuning(autotuning, persistent):
    x = torch.randn(5, 12, requires_grad=True)
    a, b = torch.randn(3, 4, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    with kronops.kron.dispatch.override(persistent=persistent):
        y = kronops.kron_linear(x, a, b)
    ref = x @ torch.kron(a, b).T
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(y.square().sum(), (x, a, b))
    for got, want in zip(grads, torch.autograd.grad(ref.square().sum(), (x, a, b))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
