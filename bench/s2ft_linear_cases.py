"""Benchmark cases of the S²FT op: sparse_linear in rows and cols mode.

Providers: kronops, also with its route pinned (the merged weight or the op's Δ products:
the choice of ``dispatch.sparse_merge_pays``); "composite", the same update written in plain
PyTorch autograd (a dense GEMM plus an indexed add, saving all of x); "naive", the update
applied to a materialised W' (dense dW, then only the selection kept); "full fine-tuning",
the layer with its whole weight trainable, PEFT LoRA of a similar trainable size (when peft
is installed) and the frozen layer alone (the floor: its forward and dX GEMMs): timed only,
they compute other functions.
"""
import torch
import torch.nn.functional as F

import kronops
from kronops.testing import naive_sparse_linear

from .cases import MODES, Provider, build_case, element_bytes, input_sets
from .kron_cases import pinned
from .peft_providers import lora_layer, peft_version


def _selection(size: int, fraction: float, device, contiguous: bool):
    """(what kronops takes, the same positions as a tensor): a random sorted selection, or a
    range starting a quarter in (a co-permuted layer's block)."""
    count = max(1, round(size * fraction))
    if contiguous:
        sel = range(size // 4, size // 4 + count)
        return sel, torch.arange(sel.start, sel.stop, device=device)
    index = torch.randperm(size, device=device)[:count].sort().values
    return index, index


def sparse_linear_cases(rows, in_features, out_features, fraction, mode_name, dtype, device,
                        modes=MODES, contiguous=False):
    """sparse_linear with a random selection of ``fraction`` of the rows (or columns), or with
    a contiguous one (``contiguous``: the co-permuted case, a range)."""
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) / in_features ** 0.5
    bias = torch.randn(out_features, device=device, dtype=dtype)
    cols = mode_name == "cols"
    given, sel = _selection(in_features if cols else out_features, fraction, device, contiguous)
    delta_shape = (out_features, sel.numel()) if cols else (sel.numel(), in_features)
    sets = input_sets([(rows, in_features), delta_shape], dtype, device, True)
    select = {"cols": sel} if cols else {"rows": sel}
    given = {"cols": given} if cols else {"rows": given}

    def composite(x, delta):
        y = F.linear(x, weight, bias)
        if cols:
            return y + x[:, sel] @ delta.mT
        return y.index_add(1, sel, x @ delta.mT)

    def naive(x, delta):
        return naive_sparse_linear(x, weight, delta, bias=bias, **select)

    def reference(x, delta):  # fp64 inputs
        return naive_sparse_linear(x, weight.double(), delta, bias=bias.double(), **select)

    def op(x, delta):
        return kronops.sparse_linear(x, weight, delta, bias=bias, **given)

    full = weight.clone().requires_grad_()
    providers = {
        "kronops": Provider(op),
        "kronops (merged weight)": Provider(pinned(op, merge=True)),
        "kronops (Δ products)": Provider(pinned(op, merge=False)),
        "composite": Provider(composite),
        "naive (full FT, masked)": Provider(naive),
        "full fine-tuning": Provider(lambda x, delta: F.linear(x, full, bias), [full]),
        "nn.Linear (base only)": Provider(lambda x, delta: F.linear(x, weight, bias)),
    }
    timed_only = {"full fine-tuning", "nn.Linear (base only)"}
    if peft_version() is not None:
        base = torch.nn.Linear(in_features, out_features, device=device, dtype=dtype)
        with torch.no_grad():
            base.weight.copy_(weight)
            base.bias.copy_(bias)
        name, lora, params = lora_layer(base, delta_shape[0] * delta_shape[1])
        providers[name] = Provider(lambda x, delta: lora(x), params)
        timed_only.add(name)
    shape = (f"{rows}x{in_features}->{out_features} {mode_name} "
             f"{sel.numel()}/{in_features if cols else out_features}"
             f"{' contiguous' if contiguous else ''}")
    elt = element_bytes(dtype)
    io = (rows * (in_features + out_features) + in_features * out_features) * elt
    gemm, small = 2 * rows * in_features * out_features, 2 * rows * delta_shape[0] * delta_shape[1]
    # Forward: one GEMM; backward: the dX GEMM plus the small dΔ and dX terms (no dW).
    work = {"forward": (io, gemm + small), "backward": (io, gemm + 2 * small),
            "forward+backward": (2 * io, 2 * gemm + 3 * small)}
    for mode in modes:
        yield build_case(f"sparse_linear[{mode_name}]", mode, shape, rows * in_features, io,
                         gemm + small, providers, reference, sets[0], sets,
                         unchecked=timed_only, work=work)
