"""The S²FT and serving ops called directly (``torch.ops.kronops.*``) with bad arguments:
every CPU backend (the PyTorch kernels, the native kernels, the Triton launchers in the
interpreter) refuses each call before anything changes, with the same exception type and a
message naming the op and the argument. The good calls the bad ones are made from run, and
agree, on every backend."""
import contextlib

import pytest
import torch
from conftest import ON_GPU, assert_close

import kronops
from kronops import native
from kronops.serving.routes import tile_table

def backends() -> dict:
    """For each backend that takes CPU tensors here, a context manager that selects it: the
    PyTorch kernels, the native ones (when built), the Triton launchers (in the interpreter)."""
    found = {"composite": native.disabled}
    if native.available():
        found["native"] = contextlib.nullcontext
    if not ON_GPU:
        found["triton"] = kronops.backends.triton_on_cpu
    return found


@pytest.fixture(params=["composite", "native", "triton"])
def cpu_backend(request):
    """Each backend that takes CPU tensors, in turn."""
    if request.param not in backends():
        pytest.skip(f"the {request.param} kernels do not take CPU tensors here")
    with backends()[request.param]():
        yield


# A mixed batch of 9 rows for 3 members: member 0 adapts rows 0, 4, 7 (a gather), member 1
# none, member 2 the consecutive rows 1-3 (a slice); rows 5, 6, 8 keep the base output.
TOKENS, OFFSETS, STARTS = [0, 4, 7, 1, 2, 3], [0, 3, 3, 6], [-1, -1, 1]
WIDTH, WIDTHS = 4, [3, 0, 4]


def linear(cols=False):
    return dict(x=torch.randn(5, 8), weight=torch.randn(6, 8),
                delta=torch.randn(6, 3) if cols else torch.randn(3, 8),
                index=torch.tensor([0, 2, 5]), start=0, bias=torch.randn(6), cols=cols)


def input_grad(cols=False):
    return dict(dy=torch.randn(5, 6), weight=torch.randn(6, 8),
                delta=torch.randn(6, 3) if cols else torch.randn(3, 8),
                index=torch.tensor([0, 2, 5]), start=0, cols=cols)


def delta_grad(cols=False):
    return dict(dy=torch.randn(5, 6), x=torch.randn(5, 3) if cols else torch.randn(5, 8),
                index=torch.tensor([0, 2, 5]), start=0, cols=cols, rows_of_delta=3)


def adamw(cols=False, master=False):
    shape = (6, 3) if cols else (3, 8)
    return dict(weight=torch.randn(6, 8), grad=torch.randn(shape), exp_avg=torch.randn(shape),
                exp_avg_sq=torch.rand(shape), master=torch.randn(shape) if master else None,
                index=torch.tensor([0, 2, 5]), start=0, cols=cols, lr=0.1, beta1=0.9,
                beta2=0.99, eps=1e-8, weight_decay=0.1, step=2)


def routing(columns):
    return dict(tokens=torch.tensor(TOKENS), tiles=tile_table(OFFSETS, columns, "cpu"),
                offsets=list(OFFSETS), starts=list(STARTS))


def kron():
    return dict(y=torch.randn(9, 10), x=torch.randn(9, 12), a=torch.randn(3, 5, 3),
                b=torch.randn(3, 2, 4), **routing([(p, 0) for p in range(3)]))


def sparse(cols=False):
    out, features = 7, (7 if cols else 12)
    values, index = torch.zeros(3 * WIDTH, features), torch.zeros(3 * WIDTH, dtype=torch.int64)
    for p, w in enumerate(WIDTHS):
        values[p * WIDTH:p * WIDTH + w] = torch.randn(w, features)
        index[p * WIDTH:p * WIDTH + w] = torch.randperm(12 if cols else out)[:w].sort().values
    columns = [(p * WIDTH, p * WIDTH + w) for p, w in enumerate(WIDTHS)]
    return dict(y=torch.randn(9, out), x=torch.randn(9, 12), values=values, index=index,
                **routing(columns), widths=list(WIDTHS), cols=cols)


BASES = {"sparse_linear": linear, "sparse_input_grad": input_grad,
         "sparse_delta_grad": delta_grad, "sparse_adamw": adamw, "routed_kron_add": kron,
         "routed_sparse_add": sparse}


def column_major(args: dict, *names: str) -> dict:
    """``args`` with the 2-D tensors ``names`` in column-major copies (any strides work)."""
    return {**args, **{name: args[name].T.contiguous().T for name in names}}


def base_calls():
    """(op, base) for every op and mode; adamw also with master values, and with the state
    and a routed x column-major."""
    calls = [(op, make()) for op, make in BASES.items()]
    calls += [(op, make(cols=True)) for op, make in BASES.items() if op != "routed_kron_add"]
    return calls + [("sparse_adamw", adamw(master=True)),
                    ("sparse_adamw", column_major(adamw(cols=True, master=True), "exp_avg",
                                                  "exp_avg_sq", "master")),
                    ("routed_kron_add", column_major(kron(), "x")),
                    ("routed_sparse_add", column_major(sparse(), "x"))]


def run(op: str, args: dict):
    return getattr(torch.ops.kronops, op)(**args)


def test_base_calls_agree():
    """The calls the bad ones are made from are good: every backend accepts them, with one
    result (the outputs, or the updated y, weight and optimizer state)."""
    for op, base in base_calls():
        results = []
        for context in backends().values():
            args = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in base.items()}
            with context():
                out = run(op, args)
            results.append([out] if out is not None else
                           [v for v in args.values() if isinstance(v, torch.Tensor)])
        for result in results[1:]:
            for got, want in zip(result, results[0]):
                assert_close(got, want, torch.float32, op)


def case(op: str, error, message: str, mode: str = "rows", **changes):
    """A bad call: ``op``'s base call (``mode``: rows, cols or master) with ``changes``
    (values, or functions of the base arguments); the error and the message it raises."""
    base = {"rows": {}, "cols": {"cols": True}, "master": {"master": True}}[mode]
    name = "-".join([op, mode, *changes])
    return pytest.param(op, base, changes, error, f"kronops::{op}: {message}", id=name)


V, T, I = ValueError, TypeError, IndexError
BAD = [
    # sparse_linear (sparse_input_grad shares its checks but for dy's width)
    case("sparse_linear", T, "x must be a floating-point tensor", x=lambda a: a["x"].long()),
    case("sparse_linear", T, "weight has dtype", weight=lambda a: a["weight"].double()),
    case("sparse_linear", T, "delta has dtype", delta=lambda a: a["delta"].double()),
    case("sparse_linear", V, "x must be 2-D", x=torch.randn(40)),
    case("sparse_linear", V, "x must be 2-D", x=torch.randn(1, 5, 8)),
    case("sparse_linear", V, "weight must be 2-D", weight=torch.randn(48)),
    case("sparse_linear", V, "delta must be 2-D", delta=torch.randn(24)),
    case("sparse_linear", V, "x must have 8 columns", x=torch.randn(5, 7)),
    case("sparse_linear", V, r"delta must have shape \(\|R\|, in\)", delta=torch.randn(3, 7)),
    case("sparse_linear", V, r"delta must have shape \(out, \|C\|\)", "cols",
         delta=torch.randn(5, 3)),
    case("sparse_linear", V, "index has 2 positions but delta has 3", index=torch.tensor([0, 1])),
    case("sparse_linear", T, "index must have dtype torch.int64",
         index=torch.tensor([0, 2, 5], dtype=torch.int32)),
    case("sparse_linear", V, "index must be 1-D", index=torch.tensor([[0, 2, 5]])),
    case("sparse_linear", I, r"index\[2\] = 6 is out of range \[0, 6\)",
         index=torch.tensor([0, 2, 6])),
    case("sparse_linear", I, r"index\[0\] = -1 is out of range", index=torch.tensor([-1, 2, 5])),
    case("sparse_linear", I, r"index\[1\] = 8 is out of range \[0, 8\)", "cols",
         index=torch.tensor([0, 8, 9])),
    case("sparse_linear", V, r"the range \[-2, 1\) of index must lie in \[0, 6\]", index=None,
         start=-2),
    case("sparse_linear", V, r"the range \[4, 7\) of index", index=None, start=4),
    case("sparse_linear", V, r"the range \[-1, 2\) of index must lie in \[0, 8\]", "cols",
         index=None, start=-1),
    case("sparse_linear", T, "bias has dtype", bias=lambda a: a["bias"].double()),
    case("sparse_linear", V, r"bias must have shape \(out,\)", bias=torch.randn(5)),
    case("sparse_linear", V, r"bias must have shape \(out,\)", bias=torch.randn(1, 6)),
    case("sparse_input_grad", T, "dy must be a floating-point tensor",
         dy=lambda a: a["dy"].long()),
    case("sparse_input_grad", V, "dy must have 6 columns", dy=torch.randn(5, 8)),
    case("sparse_input_grad", V, "dy must be 2-D", dy=torch.randn(30)),
    case("sparse_input_grad", V, r"the range \[-2, 1\) of index", index=None, start=-2),
    case("sparse_input_grad", I, r"index\[2\] = 6 is out of range",
         index=torch.tensor([0, 2, 6])),
    case("sparse_input_grad", V, r"the range \[6, 9\) of index", "cols", index=None, start=6),
    # sparse_delta_grad
    case("sparse_delta_grad", T, "dy must be a floating-point tensor",
         dy=lambda a: a["dy"].long()),
    case("sparse_delta_grad", T, "x has dtype", x=lambda a: a["x"].double()),
    case("sparse_delta_grad", V, "dy must be 2-D", dy=torch.randn(30)),
    case("sparse_delta_grad", V, "x must be 2-D", x=torch.randn(40)),
    case("sparse_delta_grad", V, "x and dy must have the same rows", x=torch.randn(4, 8)),
    case("sparse_delta_grad", V, "x and dy must have the same rows", "cols",
         x=torch.randn(4, 3)),
    case("sparse_delta_grad", V, r"the range \[-2, 1\) of index", index=None, start=-2),
    case("sparse_delta_grad", V, r"the range \[4, 7\) of index", index=None, start=4),
    case("sparse_delta_grad", V, "rows_of_delta must be >= 0", index=None, rows_of_delta=-1),
    case("sparse_delta_grad", V, "index has 3 positions but rows_of_delta is 2",
         rows_of_delta=2),
    case("sparse_delta_grad", I, r"index\[2\] = 6 is out of range \[0, 6\)",
         index=torch.tensor([0, 2, 6])),
    case("sparse_delta_grad", T, "index must have dtype torch.int64",
         index=lambda a: a["index"].int()),
    # sparse_adamw: nothing of the weight and the state changes
    case("sparse_adamw", T, "weight must be a floating-point tensor",
         weight=lambda a: a["weight"].long()),
    case("sparse_adamw", T, "grad must be a floating-point tensor",
         grad=lambda a: a["grad"].long()),
    case("sparse_adamw", V, "weight must be 2-D", weight=torch.randn(48)),
    case("sparse_adamw", V, "grad must be 2-D", grad=torch.randn(24)),
    case("sparse_adamw", T, "exp_avg must be float32 or float64",
         exp_avg=lambda a: a["exp_avg"].half()),
    case("sparse_adamw", T, "exp_avg_sq has dtype", exp_avg_sq=lambda a: a["exp_avg_sq"].double()),
    case("sparse_adamw", V, "exp_avg and exp_avg_sq must have grad's shape",
         exp_avg=torch.randn(3, 7)),
    case("sparse_adamw", V, "exp_avg and exp_avg_sq must have grad's shape",
         exp_avg_sq=torch.rand(2, 8)),
    case("sparse_adamw", V, "step counts from 1", step=0),
    case("sparse_adamw", V, r"grad must have shape \(\|R\|, in\)", grad=torch.randn(3, 7),
         exp_avg=torch.randn(3, 7), exp_avg_sq=torch.rand(3, 7)),
    case("sparse_adamw", V, r"grad must have shape \(out, \|C\|\)", "cols",
         grad=torch.randn(5, 3), exp_avg=torch.randn(5, 3), exp_avg_sq=torch.rand(5, 3)),
    case("sparse_adamw", V, r"the range \[-2, 1\) of index must lie in \[0, 6\]", index=None,
         start=-2),
    case("sparse_adamw", V, r"the range \[4, 7\) of index", index=None, start=4),
    case("sparse_adamw", V, r"the range \[-1, 2\) of index must lie in \[0, 8\]", "cols",
         index=None, start=-1),
    case("sparse_adamw", V, "index has 2 positions but grad has 3", index=torch.tensor([0, 1])),
    case("sparse_adamw", T, "index must have dtype torch.int64",
         index=lambda a: a["index"].int()),
    case("sparse_adamw", I, r"index\[2\] = 6 is out of range \[0, 6\)",
         index=torch.tensor([0, 2, 6])),
    case("sparse_adamw", I, r"index\[0\] = -3 is out of range \[0, 8\)", "cols",
         index=torch.tensor([-3, 2, 5])),
    case("sparse_adamw", T, "master has dtype", "master", master=lambda a: a["master"].double()),
    case("sparse_adamw", V, "master must have grad's shape", "master", master=torch.randn(3, 7)),
    # routed_kron_add: nothing of y changes
    case("routed_kron_add", T, "y must be a floating-point tensor", y=lambda a: a["y"].long()),
    case("routed_kron_add", T, "x must be a floating-point tensor", x=lambda a: a["x"].long()),
    case("routed_kron_add", V, "y and x must be 2-D with the same rows", x=torch.randn(108)),
    case("routed_kron_add", V, "y and x must be 2-D with the same rows", y=torch.randn(90)),
    case("routed_kron_add", V, "y and x must be 2-D with the same rows", x=torch.randn(8, 12)),
    case("routed_kron_add", V, r"a and b must be \(members, p, q\) stacks",
         a=torch.randn(5, 3)),
    case("routed_kron_add", V, r"a and b must be \(members, p, q\) stacks",
         b=torch.randn(2, 2, 4)),
    case("routed_kron_add", T, "a has dtype", a=lambda a: a["a"].double()),
    case("routed_kron_add", T, "b has dtype", b=lambda a: a["b"].double()),
    case("routed_kron_add", V, r"x must have a2\*b2 = 12 columns", x=torch.randn(9, 11)),
    case("routed_kron_add", V, r"y must have a1\*b1 = 10 columns", y=torch.randn(9, 11)),
    case("routed_kron_add", T, "tiles must have dtype torch.int64",
         tiles=lambda a: a["tiles"].int()),
    case("routed_kron_add", V, r"tiles must have shape \(n, 4\)",
         tiles=lambda a: a["tiles"][:, :3]),
    case("routed_kron_add", V, "offsets must have 4 entries", offsets=[0, 3, 6]),
    case("routed_kron_add", V, "starts must have 3 entries", starts=[-1, 1]),
    case("routed_kron_add", T, "tokens must have dtype torch.int64",
         tokens=lambda a: a["tokens"].int()),
    case("routed_kron_add", V, "tokens must be 1-D", tokens=lambda a: a["tokens"].view(2, 3)),
    case("routed_kron_add", I, r"tokens\[2\] = 9 is out of range \[0, 9\)",
         tokens=torch.tensor([0, 4, 9, 1, 2, 3])),
    case("routed_kron_add", I, r"tokens\[0\] = -1 is out of range",
         tokens=torch.tensor([-1, 4, 7, 1, 2, 3])),
    case("routed_kron_add", V, "offsets must run from 0 to the number of tokens 6",
         offsets=[1, 3, 3, 6]),
    case("routed_kron_add", V, "offsets must run from 0 to the number of tokens 6",
         offsets=[0, 3, 3, 5]),
    case("routed_kron_add", V, "offsets must not decrease", offsets=[0, 4, 3, 6]),
    case("routed_kron_add", V, r"starts\[2\] = 7 must be -1 or a row of x with 3 rows",
         starts=[-1, -1, 7]),
    case("routed_kron_add", V, r"starts\[0\] = -2 must be -1", starts=[-2, -1, 1]),
    case("routed_kron_add", V, r"starts\[1\] = 10 must be -1", starts=[-1, 10, 1]),
    case("routed_kron_add", V, r"starts\[2\] = 2 but tokens\[3:6\] are not the rows 2 to 4",
         starts=[-1, -1, 2]),
    # routed_sparse_add: nothing of y changes
    case("routed_sparse_add", V, "y and x must be 2-D with the same rows", y=torch.randn(63)),
    case("routed_sparse_add", V, "y and x must be 2-D with the same rows", "cols",
         x=torch.randn(108)),
    case("routed_sparse_add", T, "y must be a floating-point tensor", y=lambda a: a["y"].long()),
    case("routed_sparse_add", V, "widths must have one entry per member", widths=[]),
    case("routed_sparse_add", V, r"values must be \(members \* W, features\)",
         values=torch.randn(11, 12)),
    case("routed_sparse_add", V, r"values must be \(members \* W, features\)",
         values=torch.randn(12 * 12)),
    case("routed_sparse_add", V, "index must have values' 12 entries",
         index=torch.zeros(11, dtype=torch.int64)),
    case("routed_sparse_add", V, r"values must have 12 columns \(x's width in rows mode\)",
         values=torch.randn(12, 7)),
    case("routed_sparse_add", V, r"values must have 7 columns \(y's width in cols mode\)",
         "cols", values=torch.randn(12, 12)),
    case("routed_sparse_add", T, "values has dtype", values=lambda a: a["values"].double()),
    case("routed_sparse_add", T, "index must have dtype torch.int64",
         index=lambda a: a["index"].int()),
    case("routed_sparse_add", I, r"index\[\d+\] = \d+ is out of range \[0, 7\)",
         index=lambda a: a["index"] + 7),
    case("routed_sparse_add", I, r"index\[\d+\] = \d+ is out of range \[0, 12\)", "cols",
         index=lambda a: a["index"] + 12),
    case("routed_sparse_add", V, r"widths\[0\] = 5 must lie in \[0, 4\]", widths=[5, 0, 4]),
    case("routed_sparse_add", V, r"widths\[1\] = 9 must lie in \[0, 4\]", widths=[3, 9, 4]),
    case("routed_sparse_add", V, r"widths\[2\] = -1 must lie in \[0, 4\]", widths=[3, 0, -1]),
    case("routed_sparse_add", V, "offsets must have 5 entries", widths=[3, 0, 3, 0],
         values=torch.randn(12, 12)),
    case("routed_sparse_add", I, r"tokens\[2\] = 9 is out of range",
         tokens=torch.tensor([0, 4, 9, 1, 2, 3])),
    case("routed_sparse_add", V, "offsets must not decrease", "cols", offsets=[0, 4, 3, 6]),
    case("routed_sparse_add", V, r"starts\[2\] = 7 must be -1", starts=[-1, -1, 7]),
    case("routed_sparse_add", V, r"starts\[0\] = 2 but tokens\[0:3\] are not the rows",
         starts=[2, -1, 1]),
]


@pytest.mark.parametrize("op,base,changes,error,message", BAD)
def test_bad_call_is_refused_before_anything_changes(op, base, changes, error, message,
                                                     cpu_backend):
    args = BASES[op](**base)
    args.update({k: v(args) if callable(v) else v for k, v in changes.items()})
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=message):
        run(op, args)
    for name, value in before.items():
        assert torch.equal(args[name], value), f"{name} changed"


@pytest.mark.parametrize("mode", ["rows", "cols"])
def test_bad_index_in_a_compiled_graph_is_refused(mode, cpu_backend):
    """torch.compile skips the host checks of ``sparse_linear``; the op's kernels still refuse
    an index value out of range, naming the index (cols mode gathers X[:, C] for backward)."""
    torch._dynamo.reset()
    x, weight = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8)
    delta = torch.randn((3, 8) if mode == "rows" else (6, 3), requires_grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, delta, index):
        return kronops.sparse_linear(x, weight, delta, **{mode: index})

    with pytest.raises(IndexError, match=r"kronops::sparse_linear: index\[2\] = 99 is out of "
                                         r"range"):
        f(x, delta, torch.tensor([1, 3, 99]))
