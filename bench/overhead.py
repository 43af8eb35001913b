"""Host overhead per call: Python time and kernel launches of each op at tiny shapes.

At tiny shapes the work is negligible, so the time per call is what the Python layers
(checks, custom-op dispatch, autograd, launch code) cost. Launches are counted for one
forward and one backward call. On a GPU: the kernels the profiler sees. On CPU: every
Triton grid launch plus every ATen op that does work (innermost ops only; allocations,
views and the wrapping of Python scalars excluded), each of which would be a kernel launch
on a GPU.

``python -m bench`` includes these rows for its device. ``python -m bench.overhead`` prints
them on CPU, and with ``TRITON_INTERPRET=1`` also counts the Triton kernels' launches
(the interpreter's times mean nothing, so those rows have none).
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
    "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::stride", "aten::size",
    "aten::sym_size", "aten::sym_stride", "aten::zeros_like",
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


def launches(fn, device: torch.device) -> list:
    """The profiler events of one ``fn()`` that are kernel launches (see the module
    docstring for what counts)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    inside = set()

    def mark_inside(event):
        for child in event.cpu_children:
            inside.add(id(child))
            mark_inside(child)

    found = []
    for e in events:
        if e.name == TRITON_MARK:
            found.append(e)
            mark_inside(e)
    for e in events:
        if id(e) in inside or not e.name.startswith("aten::") or e.name in NO_LAUNCH:
            continue
        if all(not shape for shape in e.input_shapes):
            continue  # on 0-dim tensors only: wrapping a Python scalar, no launch on a GPU
        if any(c.name.startswith("aten::") and c.name not in NO_LAUNCH for c in e.cpu_children):
            continue  # a composite op: its children are counted
        found.append(e)
    return found


def count_launches(fn, device: torch.device) -> int:
    """Kernel launches of one ``fn()``."""
    return len(launches(fn, device))


def microseconds(fn, device: torch.device, *, calls: int = 200, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` calls of ``fn``, in us."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(20):
        fn()
    means = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def cases(device: torch.device):
    """(name, forward(), leaves or None) at tiny shapes, fp32, from a fixed seed."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    x, a, b = leaf(8, 64), leaf(8, 8), leaf(8, 8)
    yield "kron_linear", lambda: kronops.kron_linear(x, a, b, scale=0.5), (x, a, b)
    f = [leaf(4, 4) for _ in range(3)]
    yield "kron_matmul (3 factors)", lambda: kronops.kron_matmul(x, f), (x, *f)
    layer = kronops.KronALinear(torch.nn.Linear(64, 64, device=device), a_shape=(8, 8))
    with torch.no_grad():
        layer.b.copy_(torch.randn(8, 8, generator=g))
    yield "KronALinear", lambda: layer(x), (x, layer.a, layer.b)
    w = torch.randn(64, 64, generator=g).to(device)
    rows = torch.tensor([1, 5, 9, 20, 33, 40, 41, 60], device=device)
    d_rows, d_cols = leaf(8, 64), leaf(64, 8)
    yield "sparse_linear rows", lambda: kronops.sparse_linear(x, w, d_rows, rows=rows), (x, d_rows)
    yield "sparse_linear cols", lambda: kronops.sparse_linear(x, w, d_cols, cols=rows), (x, d_cols)
    inplace = kronops.S2FTInPlaceLinear(torch.nn.Linear(64, 64, device=device), rows=rows)
    inplace.selected.grad = torch.randn(8, 64, generator=g).to(device)
    optimizer = kronops.InPlaceAdamW(inplace, lr=1e-3)
    yield "InPlaceAdamW step", optimizer.step, None


def measure(device: torch.device, timed: bool = True) -> list[dict]:
    """Per op: time (when ``timed``) and launches of one forward and one backward call."""
    results = []
    for name, forward, leaves in cases(device):
        forward()  # first calls set up state (optimizer moments, autotuning): not counted
        row = dict(op=name, forward_us=microseconds(forward, device) if timed else None,
                   forward_launches=count_launches(forward, device),
                   backward_us=None, backward_launches=None)
        if leaves is not None:
            y = forward()
            grad = torch.randn_like(y)

            def backward(y=y, leaves=leaves, grad=grad):
                return torch.autograd.grad(y, leaves, grad, retain_graph=True)

            row.update(backward_us=microseconds(backward, device) if timed else None,
                       backward_launches=count_launches(backward, device))
        results.append(row)
    return results


def table(results: list[dict]) -> str:
    def cell(us, launches):
        if launches is None:
            return f"{'':>9} {'':>11}"
        time_ = "-" if us is None else f"{us:.0f} us"
        return f"{time_:>9} {launches:>3} launches"

    lines = [f"  {'op':<26} {'forward':>22}   {'backward':>22}"]
    for r in results:
        lines.append(f"  {r['op']:<26} {cell(r['forward_us'], r['forward_launches'])}   "
                     f"{cell(r['backward_us'], r['backward_launches'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "overhead-cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    rows = {"composite (PyTorch default kernels)": measure(cpu)}
    if os.environ.get("TRITON_INTERPRET") == "1":
        with triton_launches_marked(), kronops.backends.triton_on_cpu():
            rows["triton (interpreter: launches only)"] = measure(cpu, timed=False)
    for backend, results in rows.items():
        print(f"{backend}, 1 thread:\n{table(results)}")
    with open(args.out, "w") as f:
        json.dump(dict(meta=environment(cpu), rows=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
