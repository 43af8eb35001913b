"""``python -m kronops.selftest``: every kernel this machine runs, against the references.

Each public op runs forward and backward on random inputs (a fixed seed; odd shapes, 3-D
inputs, factors stored transposed, sliced views) on each backend this machine has: on CPU the
native library's kernels (when loaded) and the PyTorch kernels (and, with
``TRITON_INTERPRET=1``, the Triton kernels in the interpreter), on CUDA (when present) the
kernels registered there (Triton, unless ``KRONOPS_BACKEND=composite``). Every dtype the
backend takes is compared with the fp64 materialising reference by the package's one error
rule (``kronops.testing``). One line per check; exit status 1 when any fails.

The ``check_*`` functions are the comparisons themselves (the property tests drive them with
generated inputs): each takes fp64 inputs, runs the op on ``dtype`` copies of the same values
and layout on the current backend, and returns the largest relative error over the output and
every gradient (inf for NaN/Inf).
"""
import argparse
import contextlib
import sys
from dataclasses import dataclass

import torch

from . import backends, native
from .dtypes import accumulation_dtype
from .kron import dispatch
from .kron.merged import kron_linear_merged
from .kron.summed import kron_linear_summed
from .kron.ops import kron_linear, kron_matmul
from .s2ft.ops import sparse_linear
from .serving.ops import routed_kron_add, routed_sparse_add
from .serving.routes import Route
from .testing import (TOLERANCE, naive_kron, naive_kron_linear, naive_kron_matmul,
                      naive_sparse_linear, relative_error)


def like(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """``t``'s values in ``dtype`` on ``device`` with ``t``'s layout (its strides within a
    storage of the same extent: a transposed or sliced view stays one)."""
    if t.is_contiguous():
        return t.to(device=device, dtype=dtype, copy=True)
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    base = torch.zeros(t.storage_offset() + extent, dtype=dtype, device=device)
    view = base.as_strided(t.shape, t.stride(), t.storage_offset())
    view.copy_(t)
    return view


def _exact(tensors: list) -> list:
    """fp64 copies on the host."""
    return [t.to(device="cpu", dtype=torch.float64, copy=True) for t in tensors]


def bounded_error(out, ref, terms) -> float:
    """Largest relative error of the tensors ``out`` against ``ref`` (fp64), each measured
    against the size of its terms: ``terms`` is the reference run on the inputs' absolute
    values (for these multilinear ops, the sum of the absolute values of what each element
    adds up), so cancellation in a sum cannot exceed a tolerance set by rounding alone."""
    return max(relative_error(o, r, magnitude=t.norm().item())
               for o, r, t in zip(out, ref, terms, strict=True))


def grad_error(fn, reference, inputs: list, dtype: torch.dtype, device, frozen=()) -> float:
    """Largest relative error of ``fn(*inputs, *frozen)`` and its gradients in ``inputs``
    (for an output gradient drawn from a fixed seed) against ``reference`` run in fp64 on the
    values ``fn`` saw (``bounded_error``)."""
    leaves = [like(t, dtype, device).requires_grad_() for t in inputs]
    constants = [like(t, dtype, device) for t in frozen]
    out = fn(*leaves, *constants)
    dy = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, leaves, dy.to(device=device, dtype=dtype))
    expected = []
    for sign in (lambda t: t, torch.abs):  # the reference, then its terms' sizes
        exact = [sign(t).requires_grad_() for t in _exact(leaves)]
        ref = reference(*exact, *[sign(t) for t in _exact(constants)])
        expected.append([ref, *torch.autograd.grad(ref, exact, sign(dy))])
    return bounded_error([out, *grads], *expected)


def check_kron_linear(x, a, b, bias, scale: float, dtype, device, base_weight=None,
                      with_base=kron_linear_merged) -> float:
    """``kron_linear(x, a, b, bias, scale=scale)`` (or ``with_base``, ``kron_linear_merged``
    or ``kron_linear_summed``, beside ``base_weight`` (out, in)) and its gradients against the
    materialised product."""
    if base_weight is None:
        return grad_error(lambda *t: kron_linear(*t, scale=scale),
                          lambda *t: naive_kron_linear(*t, scale=scale),
                          [x, a, b, bias], dtype, device)
    return grad_error(lambda x, w, a, b, bias: with_base(x, w, a, b, bias, scale=scale),
                      lambda x, w, a, b, bias: naive_kron_linear(x, a, b, bias, scale=scale)
                      + x @ w.T, [x, base_weight, a, b, bias], dtype, device)


def check_kron_matmul(x, factors: list, scale: float, dtype, device) -> float:
    """``kron_matmul(x, factors, scale=scale)`` and its gradients against the product."""
    return grad_error(lambda x, *f: kron_matmul(x, list(f), scale=scale),
                      lambda x, *f: naive_kron_matmul(x, list(f), scale=scale),
                      [x, *factors], dtype, device)


def check_sparse_linear(x, weight, delta, bias, selection: dict, dtype, device) -> float:
    """``sparse_linear`` with ``selection`` (``rows=`` or ``cols=``: an index tensor or a
    slice) and its gradients in x, delta and bias against the merged weight (the frozen
    weight gets none)."""
    def on(device_):
        return {k: v.to(device_) if isinstance(v, torch.Tensor) else v
                for k, v in selection.items()}
    return grad_error(lambda x, d, bias, w: sparse_linear(x, w, d, bias=bias, **on(device)),
                      lambda x, d, bias, w: naive_sparse_linear(x, w, d, bias=bias, **on("cpu")),
                      [x, delta, bias], dtype, device, frozen=[weight])


def check_sparse_adamw(weight, grads: list, selection: dict, dtype, device) -> float:
    """Steps of the in-place ``kronops::sparse_adamw`` on the rows (``rows=``) or columns
    (``cols=``) of ``weight`` (out, in) that ``selection`` names (an index tensor or a slice),
    one per gradient in ``grads``, against torch.optim.AdamW in fp64 on that part: the error
    of the update and of both moments (inf when anything outside the part changed)."""
    cols = "cols" in selection
    chosen = selection["cols" if cols else "rows"]
    dim = 1 if cols else 0
    index = torch.arange(weight.shape[dim])[chosen]
    given = like(weight, dtype, device)
    before = _exact([given])[0]
    part = before.index_select(dim, index).requires_grad_()
    reference = torch.optim.AdamW([part], lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                                  weight_decay=0.1)
    m = torch.zeros(part.shape, device=device, dtype=accumulation_dtype(dtype))
    v = torch.zeros_like(m)
    index_arg, start = ((None, chosen.start) if isinstance(chosen, slice) else
                        (index.to(device), 0))
    for step, grad in enumerate(grads, 1):
        seen = like(grad, dtype, device)
        torch.ops.kronops.sparse_adamw(given, seen, m, v, None, index_arg, start, cols, 0.01,
                                       0.8, 0.95, 1e-6, 0.1, step)
        part.grad = _exact([seen])[0]
        reference.step()
    after = _exact([given])[0]
    rest = torch.ones(weight.shape[dim], dtype=torch.bool)
    rest[index] = False
    if not torch.equal(after.index_select(dim, rest.nonzero().flatten()),
                       before.index_select(dim, rest.nonzero().flatten())):
        return float("inf")
    state = reference.state[part]
    old = before.index_select(dim, index)
    # the update against the weight's size: what rounding the weight to dtype allows
    return max(relative_error(after.index_select(dim, index) - old, part.detach() - old,
                              magnitude=old.norm().item()),
               relative_error([m, v], [state["exp_avg"], state["exp_avg_sq"]]))


def check_routed_kron_add(y, x, a, b, slots: list[int], dtype, device) -> float:
    """``routed_kron_add`` on a batch whose rows (``slots``: a factor index per row, -1 for
    none) each take their own (a[p], b[p]); x, y: (len(slots), tokens, features)."""
    rows, per_row = x.shape[0], x.shape[1]
    route = Route(torch.tensor(slots))
    members = tuple(range(a.shape[0]))
    groups = route.groups(rows, per_row, members, torch.device(device))
    tiles = route.tiles(groups, tuple((p, 0) for p in members), torch.device(device))
    seen = [like(t, dtype, device) for t in (y, x, a, b)]
    exact = _exact(seen)  # before the op adds into y
    got = seen[0].reshape(rows * per_row, -1)
    routed_kron_add(got, seen[1].reshape(rows * per_row, -1), seen[2], seen[3], groups.tokens,
                    tiles, groups.offsets, groups.starts)

    def reference(y, x, a, b):
        for r, p in enumerate(slots):
            if p >= 0:
                y[r] += x[r] @ naive_kron(a[p], b[p]).T
        return y
    return _routed_error(got.view(y.shape), reference, exact)


def check_routed_sparse_add(y, x, deltas: list, selections: list, slots: list[int], cols: bool,
                            dtype, device) -> float:
    """``routed_sparse_add`` on a batch whose rows (``slots``) each take their own S²FT
    delta: ``deltas[p]`` (len(R_p), in) on rows ``selections[p]`` of y, or, with ``cols``,
    (out, len(C_p)) on columns of x; x, y: (len(slots), tokens, features)."""
    rows, per_row = x.shape[0], x.shape[1]
    width = max(len(s) for s in selections)
    stored = [d.T if cols else d for d in deltas]  # (width_p, other) blocks
    values = torch.zeros(len(deltas) * width, stored[0].shape[1], dtype=torch.float64)
    index = torch.zeros(len(deltas) * width, dtype=torch.int64)
    for p, (block, sel) in enumerate(zip(stored, selections)):
        values[p * width:p * width + len(sel)] = block
        index[p * width:p * width + len(sel)] = sel
    route = Route(torch.tensor(slots))
    members = tuple(range(len(deltas)))
    groups = route.groups(rows, per_row, members, torch.device(device))
    tiles = route.tiles(groups, tuple((p * width, p * width + len(s))
                                      for p, s in enumerate(selections)), torch.device(device))
    seen = [like(t, dtype, device) for t in (y, x, *deltas)]
    exact = _exact(seen)  # before the op adds into y
    got = seen[0].reshape(rows * per_row, -1)
    routed_sparse_add(got, seen[1].reshape(rows * per_row, -1), like(values, dtype, device),
                      index.to(device), groups.tokens, tiles, groups.offsets, groups.starts,
                      [len(s) for s in selections], cols)

    def reference(y, x, *deltas):
        for r, p in enumerate(slots):
            if p >= 0:
                sel = selections[p]
                if cols:
                    y[r] += x[r][:, sel] @ deltas[p].T
                else:
                    y[r][:, sel] += x[r] @ deltas[p].T
        return y
    return _routed_error(got.view(y.shape), reference, exact)


def _routed_error(got, reference, exact: list) -> float:
    """``bounded_error`` of a serving op's output against ``reference`` (which adds into its
    first argument) on ``exact``, the fp64 values the op saw."""
    ref = reference(*[t.clone() for t in exact])
    terms = reference(*[t.abs() for t in exact])
    return bounded_error([got], [ref], [terms])


@dataclass
class Check:
    """One line of the report."""
    op: str
    path: str
    backend: str
    dtype: torch.dtype
    error: float

    @property
    def ok(self) -> bool:
        return self.error <= TOLERANCE[self.dtype]


def _randn(*shape, transposed: bool = False, sliced: bool = False) -> torch.Tensor:
    """fp64 random values, stored transposed (last two dims swapped) or as every other
    column of a wider tensor when asked."""
    if transposed:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64).mT
    if sliced:
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64)[..., ::2]
    return torch.randn(*shape, dtype=torch.float64)


FULL_PRECISION = (torch.float64, torch.float32)


def _cases():
    """(op, path, pin, check(dtype, device) -> error, dtypes) for every case of the self-test;
    ``pin()`` is the context that fixes the path (``kronops.kron.dispatch.override``); dtypes
    None: every dtype of the backend. The in-place AdamW takes fp64 and fp32 here: a 16-bit
    weight rounds each update to its own precision (the suite checks its fp32 master values)."""
    x = _randn(2, 5, 4 * 6, sliced=True)
    a, b = _randn(3, 4, transposed=True), _randn(5, 6)
    bias = _randn(3 * 5)
    weight = _randn(3 * 5, 4 * 6)
    for path, pin in [("fused", lambda: dispatch.override(materialise=False)),
                      ("materialised", lambda: dispatch.override(materialise=True))]:
        yield ("kron_linear", path, pin,
               lambda d, dev: check_kron_linear(x, a, b, bias, 0.7, d, dev), None)
    for with_base, path in [(kron_linear_merged, "merged weight"),
                            (kron_linear_summed, "base summed into the adapter")]:
        yield (with_base.__name__, path, contextlib.nullcontext,
               lambda d, dev, f=with_base: check_kron_linear(x, a, b, bias, 0.7, d, dev,
                                                             base_weight=weight, with_base=f),
               None)
    factors = [_randn(2, 3), _randn(3, 2, transposed=True), _randn(2, 4)]
    x3 = _randn(7, 3 * 2 * 4)
    for path, pin in [("mode by mode", lambda: dispatch.override(group=False)),
                      ("grouped", lambda: dispatch.override(group=True))]:
        yield ("kron_matmul", path, pin,
               lambda d, dev: check_kron_matmul(x3, factors, 1.3, d, dev), None)
    xs = _randn(2, 3, 19, sliced=True)
    w = _randn(13, 19)
    rows = torch.tensor([1, 4, 5, 11])
    for path, selection, delta in [
            ("rows, index", dict(rows=rows), _randn(4, 19)),
            ("rows, range", dict(rows=slice(3, 8)), _randn(5, 19)),
            ("cols, index", dict(cols=torch.tensor([0, 2, 3, 9, 18])), _randn(13, 5)),
            ("cols, range", dict(cols=slice(6, 10)), _randn(13, 4, transposed=True))]:
        yield ("sparse_linear", path, contextlib.nullcontext,
               lambda d, dev, s=selection, dl=delta, b=_randn(13):
               check_sparse_linear(xs, w, dl, b, s, d, dev), None)
    for path, selection, count in [("rows, index", dict(rows=torch.tensor([0, 6, 7])), 3),
                                   ("cols, range", dict(cols=slice(2, 7)), 5)]:
        shape = (13, count) if "cols" in selection else (count, 19)
        grads = [_randn(*shape) for _ in range(3)]
        yield ("sparse_adamw", path, contextlib.nullcontext,
               lambda d, dev, s=selection, g=grads: check_sparse_adamw(w, g, s, d, dev),
               FULL_PRECISION)
    slots = [0, 2, -1, 0, 1]
    xr, yr = _randn(5, 3, 4 * 6, sliced=True), _randn(5, 3, 3 * 5)
    ar, br = _randn(3, 3, 4), _randn(3, 6, 5).mT
    yield ("routed_kron_add", "3 adapters", contextlib.nullcontext,
           lambda d, dev: check_routed_kron_add(yr, xr, ar, br, slots, d, dev), None)
    for cols in (False, True):
        selections = [torch.tensor(s) for s in ([0, 3, 7], [2], [1, 5, 6, 13])]
        deltas = [_randn(15, len(s)) if cols else _randn(len(s), 24) for s in selections]
        yield ("routed_sparse_add", "cols" if cols else "rows", contextlib.nullcontext,
               lambda d, dev, c=cols, s=selections, dl=deltas:
               check_routed_sparse_add(yr, xr, dl, s, slots, c, d, dev), None)


def available_backends() -> list[tuple[str, str, object, list]]:
    """(backend, device, context, dtypes) for every backend this machine runs."""
    found = []
    if native.available():
        found.append(("native", "cpu", contextlib.nullcontext,
                      [torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    found.append(("PyTorch kernels", "cpu", native.disabled,
                  [torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    if backends.interpreting():
        # bf16 dots are wrong in Triton's interpreter (bf16 is stored as uint16 there)
        found.append(("Triton, interpreted", "cpu", backends.triton_on_cpu,
                      [torch.float32, torch.float16]))
    if torch.cuda.is_available():
        name = "Triton" if backends.backend_choice() != "composite" else "PyTorch kernels"
        found.append((name, "cuda", contextlib.nullcontext,
                      [torch.float32, torch.float16, torch.bfloat16]))
    return found


def run(seed: int = 0) -> list[Check]:
    """Every case on every backend and dtype; the inputs depend on ``seed`` only."""
    checks = []
    for backend, device, context, dtypes in available_backends():
        torch.manual_seed(seed)
        cases = list(_cases())
        with context():
            for op, path, pin, check, only in cases:
                for dtype in [d for d in dtypes if only is None or d in only]:
                    with pin():
                        try:
                            error = check(dtype, device)
                        except Exception as e:  # noqa: BLE001 (reported as a failed check)
                            print(f"{op} ({path}) on {backend} {dtype}: {type(e).__name__}: {e}",
                                  file=sys.stderr)
                            error = float("inf")
                    checks.append(Check(op, path, f"{backend} ({device})", dtype, error))
    return checks


def report(checks: list[Check]) -> str:
    """The table: op, path, backend, dtype, relative error, tolerance, ok/FAIL."""
    head = ("op", "path", "backend", "dtype", "rel error", "tolerance", "")
    lines = [(c.op, c.path, c.backend, str(c.dtype).removeprefix("torch."), f"{c.error:.1e}",
              f"{TOLERANCE[c.dtype]:.0e}", "ok" if c.ok else "FAIL") for c in checks]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [head, *lines])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kronops.selftest", description=__doc__)
    parser.add_argument("--seed", type=int, default=0, help="random inputs' seed (default 0)")
    args = parser.parse_args(argv)
    checks = run(args.seed)
    print(report(checks))
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks within tolerance"
          + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
