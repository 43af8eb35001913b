"""The native kernels at every instruction-set level this CPU has (``KRONOPS_CPU_ISA``,
``kronops.native.forced_isa``): bf16 against the fp64 reference within the bound derived
below, fp32 bit-identical from avx2 up (the levels differ in bf16 only), and the variable's
checks.

bf16 bound. Inputs are bf16 (exact); each product rounds its result to bf16 once
(relative error at most u = 2^-8) after accumulating in fp32 (at most n * 2^-24 for n
terms), and a scaled factor (s·A) or a bias add rounds once more. A result element passes
through at most four such roundings (s·A, the intermediate, the product, the bias add, or
for gradients s·A, U, dX), so |got - exact| <= (4u + n * 2^-24) * M, M the same expression
on absolute values (|A| |X| |B|ᵀ, ...), computed in fp64. n <= 4096 here: 4u + 2^-12.
"""
import os
import subprocess
import sys

import pytest
import torch

import kronops
from kronops import native
from kronops.kron import dispatch
from kronops.kron.merged import kron_linear_merged
from kronops.testing import naive_kron_linear, naive_sparse_linear

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BF16_BOUND = 4 * 2.0 ** -8 + 2.0 ** -12

pytestmark = pytest.mark.skipif(not native.available(), reason="native library not loaded")


def levels():
    """The levels of ``native.ISAS`` up to the detected one (all four names when not loaded,
    for the ids of skipped tests)."""
    top = native.detected_isa() if native.available() else native.ISAS[-1]
    return native.ISAS[:native.ISAS.index(top) + 1]


def assert_within_bound(got, exact, magnitude, what):
    err = (got.double() - exact).abs()
    excess = (err - BF16_BOUND * magnitude).max().item()
    assert excess <= 0, f"{what}: error above {BF16_BOUND:.3e} x |magnitude| by {excess:.3e}"


def outputs_and_grads(fn, inputs, dy, frozen=()):
    """fn(*inputs, *frozen) and its gradients for the output gradient dy (inputs only)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves, *frozen)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def check_bf16(fn, inputs, dy, what, frozen=()):
    """fn on bf16 inputs against fn in fp64, within the bound, outputs and gradients."""
    got = outputs_and_grads(fn, inputs, dy, frozen)
    exact = outputs_and_grads(fn, [t.double() for t in inputs], dy.double(),
                              [t.double() for t in frozen])
    magnitude = outputs_and_grads(fn, [t.double().abs() for t in inputs], dy.double().abs(),
                                  [t.double().abs() for t in frozen])
    for name, g, e, m in zip(["forward", *(f"grad {i}" for i in range(len(inputs)))], got,
                             exact, magnitude):
        assert g.dtype == torch.bfloat16
        assert_within_bound(g, e, m, f"{what} {name}")


# (rows, a shape, b shape): X Bᵀ first and A X first, each with small row products and large
# ones (the bf16 backward on rows transposed at avx512 and up, in fp32 below), and large ones
# with a factor under 16 columns (per row on the bf16 GEMMs); mode-major when x is frozen; the
# FMA kernel's tile widths (59 = 3 * 16 + 8 + 3 columns), odd sizes.
KRON_CASES = [(37, (16, 24), (24, 16)), (21, (6, 5), (59, 7)), (13, (7, 40), (3, 9)),
              (64, (32, 32), (32, 32)), (9, (40, 24), (30, 20)), (11, (12, 48), (60, 36)),
              (5, (64, 8), (48, 12)), (5, (128, 24), (96, 8))]


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("rows,a_shape,b_shape", KRON_CASES)
def test_kron_linear_bf16_within_bound(level, rows, a_shape, b_shape):
    x = torch.randn(rows, a_shape[1] * b_shape[1]).bfloat16()
    a, b = torch.randn(*a_shape).bfloat16(), torch.randn(*b_shape).bfloat16()
    bias = torch.randn(a_shape[0] * b_shape[0]).bfloat16()
    dy = torch.randn(rows, a_shape[0] * b_shape[0]).bfloat16()
    with native.forced_isa(level), dispatch.override(materialise=False):
        check_bf16(lambda *t: kronops.kron_linear(*t, scale=0.7), [x, a, b, bias], dy,
                   f"kron_linear {level}")
        check_bf16(lambda a, b, x: kronops.kron_linear(x, a, b, scale=0.7), [a, b], dy,
                   f"kron_linear, x frozen, {level}", frozen=[x])
        weight = torch.randn(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]).bfloat16()
        check_bf16(lambda x, a, b, w: kron_linear_merged(x, w, a, b, scale=0.7), [x, a, b], dy,
                   f"kron_linear_merged {level}", frozen=[weight])
        check_bf16(lambda x, f1, f2, f3: kronops.kron_matmul(x, [f1, f2, f3]),
                   [torch.randn(rows, 120).bfloat16(), torch.randn(3, 5).bfloat16(), torch.randn(2, 4).bfloat16(),
                    torch.randn(5, 6).bfloat16()], torch.randn(rows, 30).bfloat16(),
                   f"kron_matmul {level}")


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("rows,a_shape,b_shape", KRON_CASES[:5])
@pytest.mark.parametrize("trained", ["x", "xa", "xb"])
def test_kron_linear_bf16_gradient_subsets(level, rows, a_shape, b_shape, trained):
    """dX with one factor's gradient or none: the bf16 backward on rows transposed uses its
    dead buffers again (one factor wider than the other, or as wide), in both orders."""
    x = torch.randn(rows, a_shape[1] * b_shape[1]).bfloat16()
    a, b = torch.randn(*a_shape).bfloat16(), torch.randn(*b_shape).bfloat16()
    dy = torch.randn(rows, a_shape[0] * b_shape[0]).bfloat16()
    named = {"x": x, "a": a, "b": b}
    inputs = [named[n] for n in trained]
    frozen = [t for n, t in named.items() if n not in trained]

    def fn(*tensors):
        given = dict(zip([*trained, *(n for n in "xab" if n not in trained)], tensors))
        return kronops.kron_linear(given["x"], given["a"], given["b"], scale=0.7)

    with native.forced_isa(level), dispatch.override(materialise=False):
        check_bf16(fn, inputs, dy, f"kron_linear, gradients of {trained}, {level}", frozen)


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("a_shape,b_shape", [((16, 24), (24, 16)), ((13, 9), (11, 17))])
def test_kron_linear_bf16_any_strides(level, a_shape, b_shape):
    # x a transposed view, dy one row expanded (stride 0): the per-row transposes take any
    # strides (8x8 tiles and their edges on rows stored row-major, a strided copy otherwise).
    rows, (a1, a2), (b1, b2) = 19, a_shape, b_shape
    x = torch.randn(a2 * b2, rows).bfloat16().t()
    a, b = torch.randn(a1, a2).bfloat16(), torch.randn(b1, b2).bfloat16()
    dy = torch.randn(1, a1 * b1).bfloat16().expand(rows, a1 * b1)
    with native.forced_isa(level), dispatch.override(materialise=False):
        check_bf16(lambda *t: kronops.kron_linear(*t, scale=0.7), [x, a, b], dy,
                   f"kron_linear, strided, {level}")


@pytest.mark.parametrize("level", levels())
@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("kind", ["index", "range"])
def test_sparse_linear_bf16_within_bound(level, mode, kind):
    weight = torch.randn(40, 56).bfloat16()
    size = 40 if mode == "rows" else 56
    sel = torch.randperm(size)[:9].sort().values if kind == "index" else range(7, 16)
    count = 9
    delta = torch.randn(*((count, 56) if mode == "rows" else (40, count))).bfloat16()
    x, dy = torch.randn(33, 56).bfloat16(), torch.randn(33, 40).bfloat16()

    def op(x, delta, weight):
        return kronops.sparse_linear(x, weight, delta, **{mode: sel})

    with native.forced_isa(level):
        check_bf16(op, [x, delta], dy, f"sparse_linear[{mode}] {level}", frozen=[weight])
    exact = naive_sparse_linear(x.double(), weight.double(), delta.double(), **{mode: sel})
    assert (outputs_and_grads(op, [x.double(), delta.double()], dy.double(),
                              [weight.double()])[0] - exact).abs().max() < 1e-12


@pytest.mark.parametrize("level", levels())
def test_routed_ops_bf16_within_bound(level):
    from kronops.serving.ops import routed_kron_add, routed_sparse_add
    tokens, tiles = torch.tensor([0, 4, 7, 1, 2, 3]), torch.empty(0, 4, dtype=torch.int64)
    route = (tokens, tiles, [0, 3, 3, 6], [-1, -1, 1])
    x = torch.randn(9, 12).bfloat16()
    a, b = torch.randn(3, 5, 3).bfloat16(), torch.randn(3, 2, 4).bfloat16()
    values, index = torch.randn(3 * 4, 12).bfloat16(), torch.randint(0, 7, (12,))
    cases = [("routed_kron_add", routed_kron_add, 10, (a, b), ()),
             ("routed_sparse_add", routed_sparse_add, 7, (values, index), ([3, 0, 4], False))]
    for name, op, out, operands, tail in cases:
        y = torch.randn(9, out).bfloat16()
        runs = []
        for cast in (torch.Tensor.clone, torch.Tensor.double, lambda t: t.double().abs()):
            z = cast(y)
            floats = [cast(t) if t.is_floating_point() else t for t in operands]
            with native.forced_isa(level):
                op(z, cast(x), *floats, *route, *tail)
            runs.append(z)
        assert runs[0].dtype == torch.bfloat16
        assert_within_bound(*runs, f"{name} {level}")


@pytest.mark.parametrize("rows,a_shape,b_shape", KRON_CASES)
def test_fp32_unchanged_above_avx2(rows, a_shape, b_shape):
    """fp32 runs the same kernels at avx2 and above: bit-identical results."""
    if native.ISAS.index(native.detected_isa()) < native.ISAS.index("avx512"):
        pytest.skip(f"this CPU supports at most {native.detected_isa()}")
    x = torch.randn(rows, a_shape[1] * b_shape[1])
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    dy = torch.randn(rows, a_shape[0] * b_shape[0])
    runs = []
    for level in ("avx2", "avx512"):
        with native.forced_isa(level), dispatch.override(materialise=False):
            runs.append(outputs_and_grads(lambda *t: kronops.kron_linear(*t, scale=0.7),
                                          [x, a, b], dy))
    for name, u, v in zip(["forward", "grad x", "grad a", "grad b"], *runs):
        assert torch.equal(u, v), name


def test_forced_level_is_restored_and_checked():
    before = native.cpu_isa()
    with native.forced_isa("portable"):
        assert native.cpu_isa() == "portable"
    assert native.cpu_isa() == before
    with pytest.raises(ValueError, match="must be one of"):
        with native.forced_isa("sse"):
            pass
    if native.detected_isa() != native.ISAS[-1]:
        with pytest.raises(ValueError, match="supports at most"):
            with native.forced_isa(native.ISAS[-1]):
                pass


def run_python(code, isa):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "KRONOPS_CPU_ISA": isa},
                          capture_output=True, text=True, cwd=ROOT)


def test_environment_variable_sets_the_level():
    run = run_python("import kronops.native as n, kronops; print(n.cpu_isa())", "portable")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "portable"
    bad = run_python("import kronops", "avx-512")
    assert bad.returncode != 0 and "ValueError: KRONOPS_CPU_ISA must be auto or one of" in bad.stderr
    if native.detected_isa() != native.ISAS[-1]:
        high = run_python("import kronops", native.ISAS[-1])
        assert high.returncode != 0 and "supports at most" in high.stderr


@pytest.mark.parametrize("level", levels())
def test_bf16_ops_opcheck_and_empty_batch(level):
    """The bf16 kernels keep the ops' contract (the kept intermediate in bf16, shapes and
    dtypes as the fake kernels say) at every level, and take an empty batch."""
    from kronops.kron.ops import kron_rows_keep
    x = torch.randn(5, 3, 5).bfloat16()
    a, b = torch.randn(2, 3).bfloat16(), torch.randn(4, 5).bfloat16()
    with native.forced_isa(level):
        torch.library.opcheck(torch.ops.kronops.kron_rows_keep.default,
                              (x, a.requires_grad_(), b, None, 0.5))
        _, inner = kron_rows_keep(x, a.detach(), b, None, 0.5)
        assert inner.dtype == torch.bfloat16
        torch.library.opcheck(torch.ops.kronops.kron_rows_grads.default,
                              (torch.randn(5, 2, 4).bfloat16(), x, a.detach(), b, 0.5, True, True,
                               True, inner))
        torch.library.opcheck(torch.ops.kronops.kron_mode.default,
                              (x, torch.randn(7, 3).bfloat16()))
        leaves = [torch.randn(0, 15).bfloat16().requires_grad_(), a.detach().requires_grad_(),
                  b.requires_grad_()]
        with dispatch.override(materialise=False):
            y = kronops.kron_linear(*leaves)
        assert y.shape == (0, 8)
        y.sum().backward()
        assert not leaves[1].grad.any() and not leaves[2].grad.any()


def test_bf16_forward_keeps_its_intermediate_on_bf16_gemms():
    """Where bf16 runs on bf16 GEMMs the forward keeps its intermediate (A X here, in bf16)
    for the backward, as autograd does on the plain expression; below that level (fp32
    compute) the backward recomputes it and nothing is kept."""
    from kronops.kron.ops import inner_shape
    x = torch.randn(6, 12).bfloat16().requires_grad_()
    a = torch.randn(3, 4).bfloat16().requires_grad_()
    b = torch.randn(5, 3).bfloat16().requires_grad_()
    shape = inner_shape(6, a, b)
    for level in levels():
        with native.forced_isa(level), dispatch.override(materialise=False):
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                          lambda t: t):
                y = kronops.kron_linear(x, a, b)
            kept = [t for t in saved if tuple(t.shape) == shape]
            if native.bf16_products():
                assert len(kept) == 1 and kept[0].dtype == torch.bfloat16
            else:
                assert not kept
            y.float().sum().backward()
    with native.forced_isa("avx2"):
        assert not native.bf16_products()
