"""Compile every Triton kernel ahead of time for sm_80 and sm_90, with no GPU.

Run by tests/test_aot_compile.py in a separate process, because the test process runs
Triton in its interpreter, where kernels cannot be compiled. ``python tests/aot_compile.py``
prints one JSON line per (kernel case, element type, precision, architecture).
"""
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CAPABILITIES = [80, 90]
# (element type, tl.dot input_precision): fp32 runs as tf32 or, torch's default, ieee.
PRECISIONS = [("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")]
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Factor shapes whose tiles launches produce: all-64 (LLaMA 4096 = 64x64), all-16 (small
# or odd factors), and a small A with a large B (LoKr's factorisation of wide layers).
KRON_SHAPES = [(64, 64, 64, 64), (16, 16, 16, 16), (4, 4, 1024, 1024)]
# Per kernel: its module, the stride arguments a contiguous launch specialises to 1.
KERNELS = {
    "kron_rows_kernel": ("kron_rows", ["stride_xl", "stride_aj", "stride_bl"]),
    "kron_factor_grad_kernel": ("kron_factor_grad", ["stride_dyn", "stride_fq", "stride_xq"]),
    # S²FT; sparse_matmul_add's b is Δ (stride_bk = 1) in forward and Δᵀ (stride_bn = 1) in
    # dX, so its cases name their own unit strides. The AdamW kernel has no dot ("nodot").
    "sparse_matmul_add_kernel": ("sparse_linear", ["stride_ak", "stride_bk", "stride_on"]),
    "sparse_delta_grad_kernel": ("sparse_delta_grad", ["stride_dp", "stride_xq"]),
    "sparse_adamw_kernel": ("sparse_adamw", ["stride_wc", "stride_gq"]),
}
# Pointer and float-scalar arguments that are not of the element type / i32.
POINTER_TYPES = {"partial_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "idx_ptr": "*i64",
                 "a_idx_ptr": "*i64", "out_idx_ptr": "*i64", "d_idx_ptr": "*i64",
                 "x_idx_ptr": "*i64"}
FLOAT_ARGS = {"scale", "lr", "beta1", "beta2", "eps", "weight_decay", "step_size",
              "bias_correction2_sqrt"}


def sparse_cases(precisions=PRECISIONS) -> list:
    """(kernel name, constexprs, element, unit strides or None) for the S²FT launches.

    Their tile lengths come from the configs, so flags and dtypes are all that vary.
    """
    launches = []
    for element, precision in precisions:
        for gather, scatter, b_unit in [(False, True, "stride_bk"), (True, False, "stride_bk"),
                                        (False, False, "stride_bk"), (True, False, "stride_bn"),
                                        (False, True, "stride_bn"), (False, False, "stride_bn")]:
            launches.append(("sparse_matmul_add_kernel",
                             dict(GATHER_A=gather, SCATTER_OUT=scatter, DOT_PRECISION=precision),
                             element, ["stride_ak", b_unit, "stride_on"]))
        for gather_d, gather_x in [(True, False), (False, False), (False, True)]:
            launches.append(("sparse_delta_grad_kernel",
                             dict(GATHER_D=gather_d, GATHER_X=gather_x, DOT_PRECISION=precision),
                             element, None))
    for element in sorted(ELEMENT_BYTES):
        for cols, gather in itertools.product([False, True], repeat=2):
            launches.append(("sparse_adamw_kernel", dict(COLS=cols, GATHER=gather), element, None))
    return launches


def kernel_cases() -> dict:
    """{case id: (kernel name, constexprs, config index, element, unit strides)} for every
    launchable config, once.

    The constexprs include the element type and dot precision, which the tile lengths and
    the register budget depend on.
    """
    rows = importlib.import_module("kronops.kernels.kron_rows")
    grad = importlib.import_module("kronops.kernels.kron_factor_grad")
    cases = {}
    for (a1, a2, b1, b2), (element, precision) in itertools.product(KRON_SHAPES, PRECISIONS):
        # What kron_linear launches: forward (with or without bias), dX (A^T and B^T as
        # strided views: their first strides are 1), dA, and dB (dY and X per-row transposed).
        launches = [
            (rows, "kron_rows_kernel", "fwd", dict(HAS_BIAS=True, **rows.tile_shape(a1, a2, b1, b2, precision)),
             ["stride_xl", "stride_aj", "stride_bl"]),
            (rows, "kron_rows_kernel", "fwd", dict(HAS_BIAS=False, **rows.tile_shape(a1, a2, b1, b2, precision)),
             ["stride_xl", "stride_aj", "stride_bl"]),
            (rows, "kron_rows_kernel", "dx", dict(HAS_BIAS=False, **rows.tile_shape(a2, a1, b2, b1, precision)),
             ["stride_xl", "stride_ai", "stride_bn"]),
            (grad, "kron_factor_grad_kernel", "da", grad.tile_shape(a1, b1, a2, b2, precision),
             ["stride_dyn", "stride_fq", "stride_xq"]),
            (grad, "kron_factor_grad_kernel", "db", grad.tile_shape(b1, a1, b2, a2, precision),
             ["stride_dyp", "stride_fq", "stride_xr"]),
        ]
        for module, name, role, constexprs, unit_strides in launches:
            for config in module._kernel.viable_configs(constexprs, ELEMENT_BYTES[element]):
                index = module.CONFIGS.index(config)
                flags = "-".join(f"{k}{int(v)}" for k, v in constexprs.items()
                                 if k.startswith(("BLOCK", "HAS")))
                cases[f"{name}-{role}-{flags}-cfg{index}-{element}-{precision}"] = \
                    (name, constexprs, index, element, unit_strides)
    for name, constexprs, element, unit_strides in sparse_cases():
        module = importlib.import_module(f"kronops.kernels.{KERNELS[name][0]}")
        flags = "-".join(f"{k}{int(v)}" for k, v in constexprs.items() if isinstance(v, bool))
        strides = "" if unit_strides is None else "-" + unit_strides[1]
        precision = constexprs.get("DOT_PRECISION", "nodot")
        for config in module._kernel.viable_configs(constexprs, ELEMENT_BYTES[element]):
            index = module.CONFIGS.index(config)
            cases[f"{name}-{flags}{strides}-cfg{index}-{element}-{precision}"] = \
                (name, constexprs, index, element, unit_strides)
    return cases


def compile_case(case, capability) -> dict:
    """Compile as a launch on contiguous, 16-byte aligned tensors specialises; report usage."""
    name, constexprs, index, element, *case_strides = case
    module_name, unit_strides = KERNELS[name]
    if case_strides and case_strides[0] is not None:
        unit_strides = case_strides[0]
    module = importlib.import_module(f"kronops.kernels.{module_name}")
    fn, config = getattr(module, name), module.CONFIGS[index]
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        arg = param.name
        if param.is_constexpr or arg in unit_strides:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = POINTER_TYPES.get(arg, "*" + element)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constants = {**constexprs, **{s: 1 for s in unit_strides}, **config.kwargs}
    try:
        compiled = triton.compile(
            triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
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
    key, case, capability = job
    return key, compile_case(case, capability)


def main() -> None:
    jobs = [(f"{cid}-sm{cap}", case, cap) for cid, case in kernel_cases().items()
            for cap in CAPABILITIES]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for key, result in pool.map(_run, jobs):
            print(json.dumps({"key": key, **result}), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("aot_compile.py needs TRITON_INTERPRET unset")
    main()
