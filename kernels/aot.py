"""Compile every kernel ahead of time for sm_80 and sm_90, with no GPU, and report usage.

``python -m kronops.kernels.aot`` (with ``TRITON_INTERPRET`` unset) prints one JSON line per
(case, config, architecture): compile error or None, registers, spills (LOCAL, STACK),
shared memory, and whether the dots became tensor-core MMA. The cases are declared beside
each kernel (``compile_cases()``), for every viable tuning config, and compiled as a launch
on contiguous, 16-byte aligned tensors specialises them. The interpreter accepts kernels a
GPU compiler rejects: this is what catches them (tests/test_aot_compile.py runs it).
"""
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton

from . import partial_sums
from .kron import factor_grad, rows
from .s2ft import adamw, delta_grad, matmul_add

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CAPABILITIES = [80, 90]
KERNEL_MODULES = [rows, factor_grad, matmul_add, delta_grad, adamw, partial_sums]
FLOAT_ARGS = {"scale", "lr", "beta1", "beta2", "eps", "weight_decay", "step_size",
              "bias_correction2_sqrt"}


@functools.cache
def compile_jobs() -> dict:
    """{job id: (case, config)} for every kernel's cases and their viable configs."""
    jobs = {}
    for module in KERNEL_MODULES:
        for case in module.compile_cases():
            for i, config in enumerate(case.configs):
                jobs[f"{case.name}-cfg{i}"] = (case, config)
    return jobs


def compile_job(job_id: str, capability: int) -> dict:
    """Compile one job for sm_<capability>; its resource usage, or the error."""
    case, config = compile_jobs()[job_id]
    signature, attrs = {}, {}
    for i, param in enumerate(case.kernel.params):
        arg = param.name
        if param.is_constexpr or arg in case.unit_strides:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = case.pointer_types.get(arg, "*" + case.element)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {**case.constexprs, **{s: 1 for s in case.unit_strides}, **config.kwargs}
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=case.kernel, signature=signature, constexprs=constants,
                                      attrs=attrs),
            target=triton.backends.compiler.GPUTarget("cuda", capability, 32),
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as e:  # reported, and failed, by the test
        return dict(error=f"{type(e).__name__}: {e}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    return dict(error=None, shared=compiled.metadata.shared,
                stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                local=int(re.search(r"LOCAL:(\d+)", usage).group(1)),
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                tensor_cores="mma.sync" in ptx or "wgmma" in ptx)


def _run(job):
    job_id, capability = job
    return f"{job_id}-sm{capability}", compile_job(job_id, capability)


def main() -> None:
    jobs = [(job_id, cap) for job_id in compile_jobs() for cap in CAPABILITIES]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for key, result in pool.map(_run, jobs):
            print(json.dumps({"key": key, **result}), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("python -m kronops.kernels.aot needs TRITON_INTERPRET unset")
    main()
