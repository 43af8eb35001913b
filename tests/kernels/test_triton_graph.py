"""The CUDA kernels as graph capture sees them (``kronops.backends.traced_on_cuda``): on
CUDA tensors torch.export keeps the kronops ops and AOTInductor's lowering traces them into
their Triton kernels; CPU tensors and the interpreter keep the ops."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ON_GPU
from torch._functorch.aot_autograd import aot_export_module
from torch._subclasses.fake_tensor import FakeTensorMode

import kronops
from kronops import backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ["kronops.kron_rows.default", "kronops.sparse_linear.default",
       "kronops.sparse_linear.default"]


def test_cuda_calls_lower_to_their_triton_kernels():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "tests", "kernels", "trace_fake_cuda.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    graphs = json.loads(run.stdout)
    assert graphs["exported"] == OPS
    wrapper = "triton_kernel_wrapper_functional:"
    assert graphs["lowered"] == [wrapper + "kron_rows_kernel", wrapper + "sparse_matmul_add_kernel",
                                 wrapper + "sparse_matmul_add_kernel"]
    assert graphs["lowered_cpu"] == OPS
    assert graphs["lowered_writes"] == graphs["lowered_cpu_writes"] == []  # no index written back


class KronLayer(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a), torch.nn.Parameter(b)

    def forward(self, x):
        return (kronops.kron_linear(x, self.a, self.b, scale=0.5),)


@pytest.mark.skipif(ON_GPU, reason="the interpreter is CPU's")
def test_interpreted_kernels_stay_one_op():
    """Under TRITON_INTERPRET=1 (this process) the kernels cannot be traced: the op stays."""
    assert backends.interpreting()
    with FakeTensorMode() as mode:
        inputs = [torch.empty(8, 6, device="cuda"), torch.empty(8, 8, device="cuda"),
                  torch.empty(5, 48, device="cuda")]
    with mode:
        layer = KronLayer(*inputs[:2]).requires_grad_(False)
    with torch.no_grad(), kronops.kron.dispatch.override(materialise=False):
        gm = aot_export_module(layer, inputs[2:], trace_joint=False)[0]
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "kronops.kron_rows.default" in targets
    assert not any("triton_kernel_wrapper" in t for t in targets)


def test_every_triton_op_lists_its_kernels():
    """The kernels each op launches, as triton_op records them (compiled graphs' cache keys
    hash their source): every kernel of the op's compile cases."""
    from torch._library import triton as torch_triton
    if not hasattr(torch_triton, "triton_ops_to_kernels"):
        pytest.skip("this torch keeps no kernel table for triton_op")
    get_triton_kernels_for_op = torch_triton.get_triton_kernels_for_op
    assert backends._triton_ops
    for spec in backends._triton_ops.values():
        listed = get_triton_kernels_for_op(spec.qualname)
        expected = {case.kernel for cases in spec.compile_cases for case in cases()}
        assert listed and set(listed) == expected, spec.qualname
