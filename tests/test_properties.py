"""Property tests of the public ops on both CPU backends (native and PyTorch kernels): random
shapes (empty batches too), layouts (transposed, sliced, 3-D), dtypes, scales, paths and
selections, forward and every gradient against the fp64 references, each error measured
against the size of its terms (``kronops.selftest``'s comparisons).

Hypothesis runs derandomized (the same examples on every run: CI cannot fail at random) with
a fixed number of examples per test; a failure prints the example, which shrinks to a small
one."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronops import native
from kronops.kron import dispatch
from kronops.kron.merged import kron_linear_merged
from kronops.kron.summed import kron_linear_summed
from kronops.selftest import (check_kron_linear, check_kron_matmul, check_routed_kron_add,
                              check_routed_sparse_add, check_sparse_adamw, check_sparse_linear)
from kronops.testing import TOLERANCE

pytestmark = pytest.mark.dispatch_rules  # each example picks its path

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])
# 0, or a size every dtype represents with its full precision (fp16's normal range)
SCALES = st.one_of(st.just(0.0), st.floats(1e-3, 3), st.floats(-3, -1e-3))
SIZES = st.integers(1, 7)


@pytest.fixture(params=["native", "PyTorch kernels"])
def cpu_backend(request):
    if request.param == "PyTorch kernels":
        with native.disabled():
            yield
    elif not native.available():
        pytest.skip(f"native library {native.load_error()}")
    else:
        yield


def tensor(shape, layout: str, seed: int) -> torch.Tensor:
    """fp64 values of ``shape`` from ``seed``, stored in ``layout``: contiguous, transposed
    (its last two dims swapped in memory) or every other element of a wider last dim."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed" and len(shape) >= 2:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g,
                           dtype=torch.float64).mT
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64)[..., ::2]
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def within(error: float, dtype) -> None:
    assert error <= TOLERANCE[dtype], f"relative error {error:.3e} > {TOLERANCE[dtype]:.0e}"


@SETTINGS
@given(lead=st.lists(st.integers(0, 4), max_size=2), a=st.tuples(SIZES, SIZES),
       b=st.tuples(SIZES, SIZES), layouts=st.tuples(LAYOUTS, LAYOUTS, LAYOUTS), dtype=DTYPES,
       scale=SCALES, path=st.sampled_from(["fused", "materialised", "merged", "summed"]),
       seed=st.integers(0, 2 ** 16))
def test_kron_linear(cpu_backend, lead, a, b, layouts, dtype, scale, path, seed):
    k, n = a[1] * b[1], a[0] * b[0]
    x = tensor((*lead, k), layouts[0], seed)
    fa, fb = tensor(a, layouts[1], seed + 1), tensor(b, layouts[2], seed + 2)
    bias = tensor((n,), "contiguous", seed + 3)
    with_base = {"merged": kron_linear_merged, "summed": kron_linear_summed}.get(path)
    weight = tensor((n, k), layouts[0], seed + 4) if with_base else None
    with dispatch.override(materialise=path == "materialised"):
        within(check_kron_linear(x, fa, fb, bias, scale, dtype, "cpu", base_weight=weight,
                                 with_base=with_base), dtype)


@SETTINGS
@given(rows=st.integers(0, 9), shapes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)),
                                               min_size=1, max_size=4),
       layouts=st.lists(LAYOUTS, min_size=5, max_size=5), dtype=DTYPES, scale=SCALES,
       group=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_kron_matmul(cpu_backend, rows, shapes, layouts, dtype, scale, group, seed):
    k = 1
    for _, q in shapes:
        k *= q
    x = tensor((rows, k), layouts[0], seed)
    factors = [tensor(s, layout, seed + i + 1) for i, (s, layout) in
               enumerate(zip(shapes, layouts[1:]))]
    with dispatch.override(group=group):
        within(check_kron_matmul(x, factors, scale, dtype, "cpu"), dtype)


def selections(size: int):
    """A sorted unique index tensor or a slice of [0, size), never empty."""
    index = st.lists(st.integers(0, size - 1), min_size=1, unique=True).map(
        lambda v: torch.tensor(sorted(v)))
    span = st.integers(0, size - 1).flatmap(
        lambda start: st.integers(start + 1, size).map(lambda stop: slice(start, stop)))
    return st.one_of(index, span)


def count(selection) -> int:
    return selection.stop - selection.start if isinstance(selection, slice) else len(selection)


@st.composite
def sparse_case(draw):
    out_features, in_features = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    mode = draw(st.sampled_from(["rows", "cols"]))
    selection = draw(selections(out_features if mode == "rows" else in_features))
    return out_features, in_features, mode, selection


@SETTINGS
@given(case=sparse_case(), lead=st.lists(st.integers(0, 4), min_size=1, max_size=2),
       layouts=st.tuples(LAYOUTS, LAYOUTS, LAYOUTS), dtype=DTYPES, seed=st.integers(0, 2 ** 16))
def test_sparse_linear(cpu_backend, case, lead, layouts, dtype, seed):
    out_features, in_features, mode, selection = case
    size = count(selection)
    delta_shape = (size, in_features) if mode == "rows" else (out_features, size)
    x = tensor((*lead, in_features), layouts[0], seed)
    weight = tensor((out_features, in_features), layouts[1], seed + 1)
    delta = tensor(delta_shape, layouts[2], seed + 2)
    bias = tensor((out_features,), "contiguous", seed + 3)
    within(check_sparse_linear(x, weight, delta, bias, {mode: selection}, dtype, "cpu"), dtype)


@SETTINGS
@given(case=sparse_case(), layout=LAYOUTS, steps=st.integers(1, 3),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2 ** 16))
def test_sparse_adamw(cpu_backend, case, layout, steps, dtype, seed):
    out_features, in_features, mode, selection = case
    size = count(selection)
    part = (size, in_features) if mode == "rows" else (out_features, size)
    weight = tensor((out_features, in_features), layout, seed)
    grads = [tensor(part, "contiguous", seed + 1 + i) for i in range(steps)]
    within(check_sparse_adamw(weight, grads, {mode: selection}, dtype, "cpu"), dtype)


@st.composite
def batch_route(draw):
    """(members, slots): a row's member index per batch row, -1 for the base model."""
    members = draw(st.integers(1, 3))
    slots = draw(st.lists(st.integers(-1, members - 1), min_size=1, max_size=6))
    return members, slots


@SETTINGS
@given(route=batch_route(), per_row=st.integers(1, 3), a=st.tuples(SIZES, SIZES),
       b=st.tuples(SIZES, SIZES), layout=LAYOUTS, dtype=DTYPES, seed=st.integers(0, 2 ** 16))
def test_routed_kron_add(cpu_backend, route, per_row, a, b, layout, dtype, seed):
    members, slots = route
    x = tensor((len(slots), per_row, a[1] * b[1]), layout, seed)
    y = tensor((len(slots), per_row, a[0] * b[0]), "contiguous", seed + 1)
    fa = tensor((members, *a), layout, seed + 2)
    fb = tensor((members, *b), layout, seed + 3)
    within(check_routed_kron_add(y, x, fa, fb, slots, dtype, "cpu"), dtype)


@SETTINGS
@given(route=batch_route(), per_row=st.integers(1, 3), features=st.tuples(SIZES, SIZES),
       cols=st.booleans(), layout=LAYOUTS, dtype=DTYPES, data=st.data())
def test_routed_sparse_add(cpu_backend, route, per_row, features, cols, layout, dtype, data):
    members, slots = route
    out_features, in_features = features
    size = in_features if cols else out_features
    seed = data.draw(st.integers(0, 2 ** 16))
    chosen = [data.draw(st.lists(st.integers(0, size - 1), min_size=1, unique=True))
              for _ in range(members)]
    selections = [torch.tensor(sorted(c)) for c in chosen]
    deltas = [tensor((out_features, len(s)) if cols else (len(s), in_features), layout, seed + p)
              for p, s in enumerate(selections)]
    x = tensor((len(slots), per_row, in_features), layout, seed + members)
    y = tensor((len(slots), per_row, out_features), "contiguous", seed + members + 1)
    within(check_routed_sparse_add(y, x, deltas, selections, slots, cols, dtype, "cpu"), dtype)
