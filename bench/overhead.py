"""Host overhead per call: Python time and kernel launches of each op at tiny shapes.

``python -m bench.overhead`` (CPU; the Triton rows need ``TRITON_INTERPRET=1``) prints and
writes bench/results/overhead-cpu.json. At tiny shapes the work is negligible, so the
time per call is what the Python layers (checks, custom-op dispatch, autograd, launch
code) cost. Launches are counted for one forward and one backward call: every Triton
grid launch, plus every ATen op that does work (allocations and views excluded) -- on a
GPU each of those is a kernel launch. On a GPU, count them with the profiler instead.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

import kronops

from .report import environment

# ATen ops that launch no kernel: allocation, views and metadata.
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape",
    "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t", "aten::permute",
    "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
    "aten::narrow", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::numpy_T", "aten::mT", "aten::matrix_H", "aten::result_type",
    "aten::_unsafe_view", "aten::unflatten", "aten::flatten", "aten::contiguous", "aten::to",
    "aten::_to_copy_noop", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::set_", "aten::new_empty", "aten::new_empty_strided", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::index_select_backward",
    "aten::stride", "aten::size", "aten::sym_size", "aten::sym_stride", "aten::zeros_like",
}
TRITON_MARK = "triton launch"


@contextlib.contextmanager
def triton_launches_marked():
    """Wrap every Triton grid launch (interpreter) in a profiler range named TRITON_MARK."""
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def marked(self, *args, **kwargs):
        with torch.profiler.record_function(TRITON_MARK):
            return call(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = marked
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = call


def count_launches(fn) -> int:
    """Triton launches plus working ATen ops (innermost ones only) of one ``fn()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    inside = set()

    def mark_inside(event):
        for child in event.cpu_children:
            inside.add(id(child))
            mark_inside(child)

    count = 0
    for e in events:
        if e.name == TRITON_MARK:
            count += 1
            mark_inside(e)
    for e in events:
        if id(e) in inside or not e.name.startswith("aten::") or e.name in NO_LAUNCH:
            continue
        if any(c.name.startswith("aten::") and c.name not in NO_LAUNCH for c in e.cpu_children):
            continue  # a composite op: its children are counted
        count += 1
    return count


def microseconds(fn, *, calls: int = 200, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` calls of ``fn``, in us."""
    for _ in range(20):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def cases():
    """(name, forward(), leaves) at tiny shapes: the work is negligible next to the host."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    x, a, b = leaf(8, 64), leaf(8, 8), leaf(8, 8)
    yield "kron_linear", lambda: kronops.kron_linear(x, a, b, scale=0.5), (x, a, b)
    f = [leaf(4, 4) for _ in range(3)]
    yield "kron_matmul (3 factors)", lambda: kronops.kron_matmul(x, f), (x, *f)
    layer = kronops.KronALinear(torch.nn.Linear(64, 64), a_shape=(8, 8))
    with torch.no_grad():
        layer.b.normal_(generator=g)
    yield "KronALinear", lambda: layer(x), (x, layer.a, layer.b)
    w = torch.randn(64, 64, generator=g)
    rows = torch.tensor([1, 5, 9, 20, 33, 40, 41, 60])
    d_rows, d_cols = leaf(8, 64), leaf(64, 8)
    yield "sparse_linear rows", lambda: kronops.sparse_linear(x, w, d_rows, rows=rows), (x, d_rows)
    yield "sparse_linear cols", lambda: kronops.sparse_linear(x, w, d_cols, cols=rows), (x, d_cols)


def measure(timed: bool = True) -> list[dict]:
    """Per op: time (when ``timed``) and launches of one forward and one backward call."""
    results = []
    for name, forward, leaves in cases():
        y = forward()
        grad = torch.randn_like(y)

        def backward(y=y, leaves=leaves, grad=grad):
            return torch.autograd.grad(y, leaves, grad, retain_graph=True)

        results.append(dict(op=name, forward_us=microseconds(forward) if timed else None,
                            backward_us=microseconds(backward) if timed else None,
                            forward_launches=count_launches(forward),
                            backward_launches=count_launches(backward)))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "overhead-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {"composite": measure()}
    if os.environ.get("TRITON_INTERPRET") == "1":
        with triton_launches_marked(), triton_kernels_on_cpu():
            rows["triton (interpreter: launches only)"] = measure(timed=False)
    for backend, results in rows.items():
        print(f"{backend}:")
        for r in results:
            fwd = "-" if r["forward_us"] is None else f"{r['forward_us']:.0f} us"
            bwd = "-" if r["backward_us"] is None else f"{r['backward_us']:.0f} us"
            print(f"  {r['op']:<26} forward {fwd:>7} {r['forward_launches']:>3} launches   "
                  f"backward {bwd:>7} {r['backward_launches']:>3} launches")
    meta = environment(torch.device("cpu"))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


@contextlib.contextmanager
def triton_kernels_on_cpu():
    """The ops' Triton kernels on CPU tensors (interpreter)."""
    os.environ["KRONOPS_BACKEND"] = "triton"
    try:
        yield
    finally:
        os.environ.pop("KRONOPS_BACKEND")


if __name__ == "__main__":
    sys.exit(main())
