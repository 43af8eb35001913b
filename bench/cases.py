"""Benchmark cases: one op in one mode at one shape, its providers and its fp64 reference.

A provider is a callable ``run(i)`` on input set ``i`` (sets rotate so caches do not
flatter CPU timings) returning the op's outputs: the result in forward mode, the
gradients of its leaves otherwise. ``reference()`` gives the same outputs in fp64 for set 0.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kronops
from kronops.factor_shapes import factor_shapes
from kronops.kron_reference import kron_linear_reference, kron_matmul_reference, kron_rows_composite

MODES = ("forward", "backward", "forward+backward")
INPUT_SETS = 3


@dataclass
class Case:
    op: str
    mode: str
    shape: str
    size: int          # x-axis of the plot: elements of the input
    bytes: int         # fewest bytes the op must move (each input read once, output written once)
    flops: int         # flops of the fused algorithm (the same count for every provider)
    providers: dict[str, Callable[[int], object]]
    reference: Callable[[], object]
    unchecked: set[str] = field(default_factory=set)  # providers that compute a floor, not the op


@dataclass
class Provider:
    fn: Callable            # fn(*input_set) -> output
    params: list = field(default_factory=list)  # trainable tensors besides the input set


def _runner(provider: Provider, sets, mode, grad):
    fn, params = provider.fn, provider.params
    if mode == "forward":
        def run(i):
            with torch.no_grad():
                return fn(*sets[i])
        return run
    if mode == "backward":
        graphs = [fn(*s) for s in sets]
        return lambda i: torch.autograd.grad(graphs[i], [*sets[i], *params], grad, retain_graph=True)
    return lambda i: torch.autograd.grad(fn(*sets[i]), [*sets[i], *params], grad)


def _reference(fn, leaves, mode, grad):
    def run():
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        y = fn(*leaves64)
        return y.detach() if mode == "forward" else torch.autograd.grad(y, leaves64, grad.double())
    return run


def build_case(op, mode, shape, size, bytes_fwd, flops_fwd, providers, reference_fn,
               reference_leaves, sets, unchecked=(), work=None):
    """Runners for every provider and the fp64 reference, sharing one output gradient.

    Backward reads the output gradient and input and writes the input gradient, with about
    twice the forward flops; forward+backward is the sum. ``work`` maps a mode to its own
    (bytes, flops) where that rule does not hold.
    """
    with torch.no_grad():
        out = next(iter(providers.values())).fn(*sets[0])
    grad = torch.randn_like(out)
    factor = {"forward": 1, "backward": 2, "forward+backward": 3}[mode]
    nbytes, flops = (work or {}).get(mode, (bytes_fwd * factor, flops_fwd * factor))
    runners = {name: _runner(p, sets, mode, grad) for name, p in providers.items()}
    return Case(op, mode, shape, size, nbytes, flops, runners,
                _reference(reference_fn, reference_leaves, mode, grad), set(unchecked))


def _input_sets(shapes, dtype, device, requires_grad):
    return [[torch.randn(s, device=device, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
            for _ in range(INPUT_SETS)]


def kron_flops(rows, a1, a2, b1, b2):
    """Flops of the fused product for ``rows`` rows: X B^T, then A (that)."""
    return 2 * rows * b1 * a2 * (b2 + a1)


def kron_linear_cases(rows, in_features, out_features, dtype, device, modes=MODES):
    """kron_linear at factors near the square roots: kronops, composite, materialised."""
    (a1, a2), (b1, b2) = factor_shapes(in_features, out_features)
    shape = f"{rows}x{in_features}->{out_features} A{a1}x{a2} B{b1}x{b2}"
    elt = torch.finfo(dtype).bits // 8
    sets = _input_sets([(rows, in_features), (a1, a2), (b1, b2)], dtype, device, True)
    providers = {
        "kronops": Provider(kronops.kron_linear),
        "composite": Provider(lambda x, a, b: kron_rows_composite(
            x.view(-1, a2, b2), a, b).view(-1, out_features)),
        "naive (torch.kron)": Provider(kron_linear_reference),
    }
    io_bytes = rows * (in_features + out_features) * elt
    for mode in modes:
        yield build_case("kron_linear", mode, shape, rows * in_features, io_bytes,
                         kron_flops(rows, a1, a2, b1, b2), providers, kron_linear_reference,
                         sets[0], sets)


def kron_matmul_cases(rows, factor_shapes_, dtype, device, modes=MODES):
    """kron_matmul with N factors: kronops vs the materialised Kronecker product."""
    k = math.prod(q for _, q in factor_shapes_)
    n = math.prod(p for p, _ in factor_shapes_)
    shape = f"{rows}x{k}->{n} " + "(x)".join(f"{p}x{q}" for p, q in factor_shapes_)
    elt = torch.finfo(dtype).bits // 8
    sets = _input_sets([(rows, k), *factor_shapes_], dtype, device, True)
    providers = {
        "kronops": Provider(lambda x, *f: kronops.kron_matmul(x, f)),
        "naive (torch.kron)": Provider(lambda x, *f: kron_matmul_reference(x, f)),
    }
    # One mode at a time: each pass reads and writes the intermediate.
    flops, width = 0, k
    for p, q in factor_shapes_:
        flops += 2 * rows * (width // q) * p * q
        width = width // q * p
    for mode in modes:
        yield build_case(f"kron_matmul[{len(factor_shapes_)}]", mode, shape, rows * k,
                         rows * (k + n) * elt, flops, providers,
                         lambda x, *f: kron_matmul_reference(x, f), sets[0], sets)


def krona_layer_cases(rows, in_features, out_features, dtype, device, modes=("forward+backward",)):
    """A KronALinear training step vs the same adapter materialised (as PEFT LoKr runs it)
    and vs the frozen base nn.Linear alone (the floor the adapter adds to)."""
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    layer = kronops.KronALinear(base)
    nn.init.normal_(layer.b, std=0.02)
    (a1, a2), (b1, b2) = layer.a.shape, layer.b.shape
    shape = f"{rows}x{in_features}->{out_features} A{a1}x{a2} B{b1}x{b2}"
    elt = torch.finfo(dtype).bits // 8
    sets = _input_sets([(rows, in_features)], dtype, device, True)
    params = [layer.a, layer.b]

    def materialised(x):
        return base(x) + F.linear(x, layer.scale * torch.kron(layer.a, layer.b))

    w, bias = base.weight.detach(), base.bias.detach()

    def reference(x, a, b):
        return F.linear(x, w.double(), bias.double()) + layer.scale * kron_linear_reference(x, a, b)

    providers = {
        "kronops": Provider(layer, params),
        "naive (torch.kron)": Provider(materialised, params),
        "nn.Linear (base only)": Provider(base),
    }
    # The frozen base needs two GEMMs (forward and dX), the adapter three passes.
    gemm, kron = 2 * rows * in_features * out_features, kron_flops(rows, a1, a2, b1, b2)
    io = (rows * (in_features + out_features) + in_features * out_features) * elt
    work = {"backward": (2 * io, gemm + 2 * kron), "forward+backward": (3 * io, 2 * gemm + 3 * kron)}
    for mode in modes:
        yield build_case("KronALinear", mode, shape, rows * in_features, io, gemm + kron,
                         providers, reference, [sets[0][0], *params], sets,
                         unchecked={"nn.Linear (base only)"}, work=work)


def default_cases(full: bool, dtype, device):
    """The CPU set (about two minutes on 2 cores) or the GPU set (--full: LLaMA/MiniLM shapes)."""
    if full:
        rows = 16384
        for k, n in [(4096, 4096), (4096, 11008), (4096, 14336), (384, 1536)]:
            yield from kron_linear_cases(rows, k, n, dtype, device)
        yield from kron_matmul_cases(rows, [(16, 16)] * 3, dtype, device)
        yield from kron_matmul_cases(rows, [(64, 64), (64, 64)], dtype, device)
        for k, n in [(4096, 4096), (4096, 14336)]:
            yield from krona_layer_cases(rows, k, n, dtype, device)
    else:
        for rows, k, n in [(256, 1024, 1024), (1024, 4096, 4096), (2048, 384, 1536)]:
            yield from kron_linear_cases(rows, k, n, dtype, device)
        yield from kron_matmul_cases(512, [(16, 16)] * 3, dtype, device)
        yield from krona_layer_cases(1024, 1024, 1024, dtype, device)
