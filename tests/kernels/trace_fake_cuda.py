"""Trace a KronA + S²FT model on fake CUDA tensors, without a GPU and without the Triton
interpreter, as torch.export and AOTInductor see it; print what the graphs hold as JSON.

    python tests/kernels/trace_fake_cuda.py      (TRITON_INTERPRET unset or 0)

Run in its own process by tests/kernels/test_triton_graph.py: the test process runs Triton
in its interpreter, whose kernels cannot be traced. Three graphs: ``exported`` (torch.export:
the kronops ops kept, as for ``torch.library.triton_op``), ``lowered`` (the exported program
traced again as AOTInductor's lowering does, functionalised: the CUDA calls become
``triton_kernel_wrapper_functional`` nodes) and ``lowered_cpu`` (the same on CPU tensors:
the ops stay, so compiled CPU graphs call the native kernels), each with the inputs it
writes (none: the model is inference).

A CPU-only torch has no CUDA device guard, so the model avoids in-place updates of views on
CUDA (S²FT ranges copy Δ into an aligned buffer that way): its S²FT layers take index
tensors of aligned widths. Autograd on fake CUDA tensors needs the guard too: the graphs are
inference graphs (no backward ops).
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from torch import nn
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

import kronops


class KronS2FTIndexed(nn.Module):
    """in 48 -> KronA 64 -> S²FT rows (index) 40 -> S²FT cols (index of 16) 24."""

    def __init__(self):
        super().__init__()
        self.krona = kronops.KronALinear(nn.Linear(48, 64), a_shape=(8, 6), rank=3, alpha=6.0)
        self.rows = kronops.S2FTLinear(nn.Linear(64, 40), rows=torch.tensor([1, 4, 5, 17, 30, 39]))
        self.cols = kronops.S2FTLinear(nn.Linear(40, 24), cols=torch.arange(2, 34, 2))

    def forward(self, x):
        return self.cols(F.gelu(self.rows(F.gelu(self.krona(x)))))


def calls(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's kronops ops and Triton kernels (by kernel name), in order."""
    found = []
    for node in gm.graph.nodes:
        name = str(node.target)
        if name.startswith("kronops."):
            found.append(name)
        elif "triton_kernel_wrapper" in name:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            found.append(f"{name}:{getattr(kernel, 'fn', kernel).__name__}")
    return found


def lowered(ep, device: str, mode: FakeTensorMode):
    """The exported graph traced again on fresh fake inputs of ``device``, functionalised,
    custom Triton ops decomposed (what AOTInductor's lowering traces): (graph, the names of
    the inputs it writes)."""
    values = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"]
    with mode:
        inputs = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
                  for v in values]
    gm, signature = aot_export_module(ep.graph_module, inputs, trace_joint=False)
    return gm, sorted(signature.user_inputs_to_mutate.values())


def main() -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be traced")
    # No GPU: Triton's mutation analysis (TTIR) asks the driver for a target; give it sm_90.
    triton.runtime.driver.set_active(
        SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    out = {}
    with torch.no_grad(), kronops.kron.dispatch.override(materialise=False, merge=False):
        for device in ("cuda", "cpu"):
            model = KronS2FTIndexed().eval().requires_grad_(False)
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with mode:
                fake = model._apply(lambda t: torch.empty_like(t, device=device))
                x = torch.empty(5, 7, 48, device=device)
            ep = torch.export.export(fake, (x,))
            if device == "cuda":
                out["exported"] = calls(ep.graph_module)
            gm, written = lowered(ep, device, mode)
            name = "lowered" if device == "cuda" else "lowered_cpu"
            out[name], out[name + "_writes"] = calls(gm), written
    return out


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
