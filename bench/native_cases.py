"""Benchmark cases of the CPU backends side by side: the native kernels (when built), the
PyTorch kernels of the same ops, the native kernels at the level below the CPU's (``_lower_isa``),
plain torch autograd on the same expression, plain PyTorch in the inputs' dtype, FastKron
(``pyfastkron``, when installed: its x86 AVX backend) and the materialised reference.

Every provider is checked against fp64 like every row. "kronops (PyTorch kernels)" sets the
native kernels aside for each call (``kronops.native.disabled()``: ~75 us of unregistering
and registering again on these CPUs, outside its timed calls: ``Provider.setting``).
"""
import math

import torch

import kronops
from kronops import native
from kronops.kron.torch_kernels import kron_rows as torch_kron_rows
from kronops.testing import naive_kron_matmul, naive_sparse_linear

from .cases import MODES, Provider, build_case, element_bytes, input_sets
from .optional import load_fastkron

FASTKRON = "FastKron (pyfastkron)"


def fastkron():
    """pyfastkron's torch module, or None when it cannot be used (``bench.optional`` says why)."""
    return load_fastkron()[0]


def _composite(fn):
    def run(*args):
        with native.disabled():
            return fn(*args)
    return run


def _kron(x, *factors):
    if len(factors) == 2:
        return kronops.kron_linear(x, *factors)
    return kronops.kron_matmul(x, factors)


def _autograd(x, *factors):
    """The PyTorch kernels' expression under plain autograd (two factors: torch_kron_rows;
    more: one mode at a time, then the last two)."""
    q = [f.shape[1] for f in factors]
    t = x.reshape(-1, math.prod(q))
    for k, f in enumerate(factors[:-2]):
        t = torch.matmul(f, t.reshape(-1, q[k], math.prod(q[k + 1:])))
    a, b = factors[-2:]
    y = torch_kron_rows(t.reshape(-1, q[-2], q[-1]), a, b)
    return y.reshape(x.shape[0], -1)


def _plain(x, a, b):
    """Plain PyTorch in the inputs' dtype: A @ X_m @ Bᵀ as two batched matmuls."""
    m = x.reshape(-1, a.shape[1], b.shape[1])
    return (a @ m @ b.T).reshape(x.shape[0], -1)


def _lower_isa():
    """The level below the detected one whose kernels differ (the AVX2 FMA kernel and bf16
    computed in fp32), or None where the CPU has no AVX-512."""
    if not native.available() or native.ISAS.index(native.detected_isa()) < 2:
        return None
    return "avx2"


def _fastkron(x, *factors):
    # FastKron computes x (F1ᵀ ⊗ ... ⊗ FNᵀ) = x kron(F1, ..., FN)ᵀ
    return fastkron().gemkm(x, [f.T for f in factors])


def kron_cpu_cases(rows, factor_shapes, dtype, device, modes=("forward", "forward+backward")):
    """x (rows, q1*...*qN) @ kron(f1, ..., fN).T on every CPU backend."""
    k = math.prod(q for _, q in factor_shapes)
    n = math.prod(p for p, _ in factor_shapes)
    shape = f"{rows}x{k}->{n} " + "(x)".join(f"{p}x{q}" for p, q in factor_shapes)
    sets = input_sets([(rows, k), *factor_shapes], dtype, device, True)
    providers = {}
    if native.available():
        providers["kronops (native)"] = Provider(_kron)
        lower = _lower_isa()
        if lower:
            providers[f"kronops (native, KRONOPS_CPU_ISA={lower})"] = Provider(
                _kron, setting=lambda: native.forced_isa(lower))
    providers["kronops (PyTorch kernels)"] = Provider(_composite(_kron), setting=native.disabled)
    providers["torch autograd, same expression"] = Provider(_autograd)
    if len(factor_shapes) == 2:
        providers["plain PyTorch (A @ X @ Bᵀ)"] = Provider(_plain)
    if fastkron() is not None and device.type == "cpu" and dtype in (torch.float32, torch.float64):
        providers[FASTKRON] = Provider(_fastkron)
    providers["naive (torch.kron)"] = Provider(lambda x, *f: naive_kron_matmul(x, f))
    flops, width = 0, k
    for p, q in reversed(factor_shapes):  # one factor at a time, the fewest flops
        flops += 2 * rows * (width // q) * p * q
        width = width // q * p
    for mode in modes:
        yield build_case("kron (CPU backends)", mode, shape, rows * k,
                         rows * (k + n) * element_bytes(dtype), flops, providers,
                         lambda x, *f: naive_kron_matmul(x, f), sets[0], sets)


def s2ft_cpu_cases(rows, in_features, out_features, fraction, mode_name, dtype, device,
                   modes=MODES):
    """sparse_linear with a random selection on the native and the PyTorch kernels."""
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5
    cols = mode_name == "cols"
    size = in_features if cols else out_features
    sel = torch.randperm(size, device=device)[:max(1, round(size * fraction))].sort().values
    delta_shape = (out_features, sel.numel()) if cols else (sel.numel(), in_features)
    sets = input_sets([(rows, in_features), delta_shape], dtype, device, True)
    select = {mode_name: sel}

    def op(x, delta):
        return kronops.sparse_linear(x, weight, delta, **select)

    def reference(x, delta):
        return naive_sparse_linear(x, weight.to(x.dtype), delta, **select)

    providers = {}
    if native.available():
        providers["kronops (native)"] = Provider(op)
    providers["kronops (PyTorch kernels)"] = Provider(_composite(op), setting=native.disabled)
    providers["naive (full FT, masked)"] = Provider(reference)
    shape = f"{rows}x{in_features}->{out_features} {mode_name} {sel.numel()}/{size}"
    io = (rows * (in_features + out_features) + in_features * out_features) * element_bytes(dtype)
    gemm, small = 2 * rows * in_features * out_features, 2 * rows * delta_shape[0] * delta_shape[1]
    work = {"forward": (io, gemm + small), "backward": (io, gemm + 2 * small),
            "forward+backward": (2 * io, 2 * gemm + 3 * small)}
    for mode in modes:
        yield build_case(f"sparse_linear[{mode_name}] (CPU backends)", mode, shape,
                         rows * in_features, io, gemm + small, providers, reference, sets[0], sets,
                         work=work)
