"""Benchmark cases of the Kronecker ops: kron_linear, kron_matmul and the KronALinear step."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kronops
from kronops.kernels.kron.rows_grads import fits as rows_grads_fits
from kronops.kernels.kron.rows_persistent import fits as persistent_fits
from kronops.kron import dispatch
from kronops.kron.modules import factor_shapes
from kronops.kron.torch_kernels import kron_rows as torch_kron_rows
from kronops.testing import naive_kron_linear, naive_kron_matmul

from .cases import MODES, Provider, build_case, element_bytes, input_sets
from .lycoris_provider import lycoris_providers
from .peft_providers import peft_providers


def pinned(fn, **rules):
    """``fn`` run with the dispatch rules pinned (``kronops.kron.dispatch.override``)."""
    def run(*args):
        with dispatch.override(**rules):
            return fn(*args)
    return run


def kron_flops(rows, a1, a2, b1, b2):
    """Flops of the fused product for ``rows`` rows: X B^T, then A (that)."""
    return 2 * rows * b1 * a2 * (b2 + a1)


def kron_linear_cases(rows, in_features, out_features, dtype, device, modes=MODES):
    """kron_linear at factors near the square roots: kronops, composite, materialised."""
    (a1, a2), (b1, b2) = factor_shapes(in_features, out_features)
    shape = f"{rows}x{in_features}->{out_features} A{a1}x{a2} B{b1}x{b2}"
    elt = element_bytes(dtype)
    sets = input_sets([(rows, in_features), (a1, a2), (b1, b2)], dtype, device, True)
    providers = {
        "kronops": Provider(kronops.kron_linear),
        "composite": Provider(lambda x, a, b: torch_kron_rows(
            x.view(-1, a2, b2), a, b).view(-1, out_features)),
        "naive (torch.kron)": Provider(naive_kron_linear),
    }
    # The paths the rules did not pick, beside the one they did (dispatch.override).
    device_type = torch.device(device).type
    if dispatch.materialise_pays(device_type, in_features, out_features):
        providers["kronops (fused)"] = Provider(pinned(kronops.kron_linear, materialise=False))
    if device_type == "cuda" and rows_grads_fits(a1, a2, b1, b2, dtype):
        providers["kronops (three-kernel backward)"] = Provider(
            pinned(kronops.kron_linear, one_pass=False))
    if device_type == "cuda" and persistent_fits(a1, a2, b1, b2, dtype):
        providers["kronops (persistent forward)"] = Provider(
            pinned(kronops.kron_linear, persistent=True))
    io_bytes = rows * (in_features + out_features) * elt
    for mode in modes:
        yield build_case("kron_linear", mode, shape, rows * in_features, io_bytes,
                         kron_flops(rows, a1, a2, b1, b2), providers, naive_kron_linear,
                         sets[0], sets)


def kron_matmul_cases(rows, factor_shapes_, dtype, device, modes=MODES):
    """kron_matmul with N factors: kronops vs the materialised Kronecker product."""
    k = math.prod(q for _, q in factor_shapes_)
    n = math.prod(p for p, _ in factor_shapes_)
    shape = f"{rows}x{k}->{n} " + "(x)".join(f"{p}x{q}" for p, q in factor_shapes_)
    elt = element_bytes(dtype)
    sets = input_sets([(rows, k), *factor_shapes_], dtype, device, True)
    providers = {
        "kronops": Provider(lambda x, *f: kronops.kron_matmul(x, f)),
        "naive (torch.kron)": Provider(lambda x, *f: naive_kron_matmul(x, f)),
    }
    # One mode at a time: each pass reads and writes the intermediate.
    flops, width = 0, k
    for p, q in factor_shapes_:
        flops += 2 * rows * (width // q) * p * q
        width = width // q * p
    for mode in modes:
        yield build_case(f"kron_matmul[{len(factor_shapes_)}]", mode, shape, rows * k,
                         rows * (k + n) * elt, flops, providers,
                         lambda x, *f: naive_kron_matmul(x, f), sets[0], sets)


def krona_layer_cases(rows, in_features, out_features, dtype, device, modes=("forward+backward",)):
    """A KronALinear training step vs the same adapter materialised, PEFT's LoKr and LoRA
    (when peft is installed), LyCORIS's LoKr in bypass mode (when lycoris-lora is), and the
    frozen base nn.Linear alone (the floor)."""
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype).requires_grad_(False)
    layer = kronops.KronALinear(base)
    nn.init.normal_(layer.b, std=0.02)
    (a1, a2), (b1, b2) = layer.a.shape, layer.b.shape
    shape = f"{rows}x{in_features}->{out_features} A{a1}x{a2} B{b1}x{b2}"
    elt = element_bytes(dtype)
    sets = input_sets([(rows, in_features)], dtype, device, True)
    params = [layer.a, layer.b]

    def materialised(x):
        return base(x) + F.linear(x, layer.scale * torch.kron(layer.a, layer.b))

    w, bias = base.weight.detach(), base.bias.detach()

    def reference(x, a, b):
        return F.linear(x, w.double(), bias.double()) + layer.scale * naive_kron_linear(x, a, b)

    providers = {
        "kronops": Provider(layer, params),
        "kronops (merged weight)": Provider(pinned(layer, merge=True), params),
        "kronops (separate adapter)": Provider(pinned(layer, merge=False), params),
        "naive (torch.kron)": Provider(materialised, params),
        "nn.Linear (base only)": Provider(base),
    }
    with torch.no_grad():
        peft, peft_unchecked = peft_providers(base, layer.a, layer.b, layer.scale)
        providers.update(peft)
        providers.update(lycoris_providers(base, layer.a, layer.b, layer.scale))
    # The frozen base needs two GEMMs (forward and dX), the adapter three passes.
    gemm, kron = 2 * rows * in_features * out_features, kron_flops(rows, a1, a2, b1, b2)
    io = (rows * (in_features + out_features) + in_features * out_features) * elt
    work = {"backward": (2 * io, gemm + 2 * kron), "forward+backward": (3 * io, 2 * gemm + 3 * kron)}
    for mode in modes:
        yield build_case("KronALinear", mode, shape, rows * in_features, io, gemm + kron,
                         providers, reference, [sets[0][0], *params], sets,
                         unchecked={"nn.Linear (base only)"} | peft_unchecked, work=work)
