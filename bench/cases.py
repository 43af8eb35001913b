"""Benchmark cases: one op in one mode at one shape, its providers and its fp64 reference.

A provider is a callable ``run(i)`` on input set ``i`` (sets rotate so caches do not
flatter CPU timings) returning the op's outputs: the result in forward mode, the
gradients of its leaves otherwise. ``reference()`` gives the same outputs in fp64 for set 0.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch

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
    settings: dict[str, Callable] = field(default_factory=dict)  # Provider.setting by name
    # Generation: {provider: reference(its output)}, where what a provider is checked
    # against depends on its own output (the tokens it chose, scored by the reference model);
    # in place of ``reference`` for those providers.
    references: dict[str, Callable[[object], object]] = field(default_factory=dict)
    tokens: int | None = None  # tokens one call processes (generation: its rows get tokens/s)


@dataclass
class Provider:
    fn: Callable            # fn(*input_set) -> output
    params: list = field(default_factory=list)  # trainable tensors besides the input set
    # A context that changes process state for the provider's calls (kronops.native.disabled):
    # the timing enters it outside the timed call, so its cost is not counted as the op's.
    setting: Callable | None = None


def _runner(provider: Provider, sets, mode, grad):
    fn, params = provider.fn, provider.params
    if mode == "forward":
        def run(i):
            with torch.no_grad():
                return fn(*sets[i])
        return run
    if mode == "backward":
        graphs = [fn(*s) for s in sets]
        return lambda i: torch.autograd.grad(graphs[i], [*sets[i], *params], grad,
                                             retain_graph=True, allow_unused=True)
    return lambda i: torch.autograd.grad(fn(*sets[i]), [*sets[i], *params], grad, allow_unused=True)


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
    settings = {name: p.setting for name, p in providers.items() if p.setting is not None}
    return Case(op, mode, shape, size, nbytes, flops, runners,
                _reference(reference_fn, reference_leaves, mode, grad), set(unchecked), settings)


def input_sets(shapes, dtype, device, requires_grad):
    """INPUT_SETS lists of fresh random tensors of the given shapes."""
    return [[torch.randn(s, device=device, dtype=dtype).requires_grad_(requires_grad) for s in shapes]
            for _ in range(INPUT_SETS)]


def element_bytes(dtype) -> int:
    return torch.finfo(dtype).bits // 8
