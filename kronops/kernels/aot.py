"""Compile every kernel ahead of time for sm_80 and sm_90, with no GPU, and report usage.

``python -m kronops.kernels.aot [--out FILE]`` (with ``TRITON_INTERPRET`` unset) prints a
table per kernel: for each case, config and architecture its registers, spills (cuobjdump's
LOCAL bytes, and STACK), shared memory and which tensor-core instruction its dots became
(wgmma, mma.sync, or none), or the compile error; ``--out`` also writes every result as JSON
({"<case>-cfg<i>-sm<cc>": {...}}). The cases are declared beside each kernel
(``compile_cases()``) and named by the op table (``OpSpec.compile_cases`` of every op in
``kronops.backends.SPECS``), for every viable tuning config, and specialised as a run-time launch
with the case's integer values on 16-byte aligned tensors. The interpreter accepts kernels a
GPU compiler rejects: this is what catches them (tests/kernels/test_aot_compile.py runs it).
"""
import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import triton

from ..backends import SPECS

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
CAPABILITIES = [80, 90]
FLOAT_ARGS = {"scale", "lr", "beta1", "beta2", "eps", "weight_decay", "step_size",
              "bias_correction2_sqrt"}
DIVISIBLE = [["tt.divisibility", 16]]


def case_lists() -> list:
    """The ``compile_cases`` functions the op table names, each once, in table order (kernels
    launched by several ops are compiled once)."""
    return list(dict.fromkeys(cases for spec in SPECS for cases in spec.compile_cases))


@functools.cache
def compile_jobs() -> dict:
    """{job id: (case, config)} for every kernel's cases and their viable configs."""
    jobs = {}
    for compile_cases in case_lists():
        for case in compile_cases():
            for i, config in enumerate(case.configs):
                jobs[f"{case.name}-cfg{i}"] = (case, config)
    return jobs


def int_specialisation(value: int | None) -> tuple[str, list]:
    """(type, attributes) of an integer argument as triton's launcher (3.6 to 3.9,
    ``native_specialize_impl`` with ``BaseBackend.parse_attr``) specialises it: 1 becomes the
    constant ("constexpr"), a multiple of 16 (0 too) is marked divisible by 16, values beyond
    int32 are i64. ``None`` (value not declared) gives a plain i32."""
    if value == 1:
        return "constexpr", []
    kind = "i32" if value is None or -2 ** 31 <= value < 2 ** 31 else "i64"
    return kind, DIVISIBLE if value is not None and value % 16 == 0 else []


def launch_signature(case) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``: the case's
    constexprs, its integers specialised by value, pointers divisible by 16 (torch
    allocations are 16-byte aligned), float arguments fp32."""
    signature, constexprs, attrs = {}, dict(case.constexprs), {}
    for i, param in enumerate(case.kernel.params):
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = case.pointer_types.get(arg, "*" + case.element)
            attrs[(i,)] = DIVISIBLE
        elif arg in FLOAT_ARGS:
            signature[arg] = "fp32"
        else:
            signature[arg], attr = int_specialisation(case.ints.get(arg))
            if signature[arg] == "constexpr":
                constexprs[arg] = 1
            elif attr:
                attrs[(i,)] = attr
    return signature, constexprs, attrs


def resource_usage(cubin: bytes) -> dict:
    """Registers, LOCAL and STACK bytes from triton's bundled cuobjdump; None where it is
    absent (registers are in the compile metadata only once a GPU has loaded the kernel)."""
    if not os.path.exists(CUOBJDUMP):
        return dict(registers=None, local=None, stack=None)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return {key: int(re.search(rf"{field}:(\d+)", usage).group(1))
            for key, field in [("registers", "REG"), ("local", "LOCAL"), ("stack", "STACK")]}


def compile_kernel(case, config, capability: int):
    """``case`` with ``config`` compiled for sm_<capability> as a launch specialises it."""
    signature, constexprs, attrs = launch_signature(case)
    return triton.compile(
        triton.compiler.ASTSource(fn=case.kernel, signature=signature,
                                  constexprs={**constexprs, **config.kwargs}, attrs=attrs),
        target=triton.backends.compiler.GPUTarget("cuda", capability, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def compile_job(job_id: str, capability: int) -> dict:
    """Compile one job for sm_<capability>; its resource usage, or the error."""
    try:
        compiled = compile_kernel(*compile_jobs()[job_id], capability)
    except Exception as e:  # reported, and failed, by the test
        return dict(error=f"{type(e).__name__}: {e}")
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else None
    return dict(error=None, shared=compiled.metadata.shared, mma=mma,
                **resource_usage(compiled.asm["cubin"]))


def _exit_with(parent: int) -> None:
    """Worker initializer: the worker exits as soon as ``parent`` is gone (killed on a time
    limit or an interrupt), rather than living on orphaned."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _run(job):
    job_id, capability = job
    return f"{job_id}-sm{capability}", compile_job(job_id, capability)


def table(results: dict) -> str:
    """One block per kernel: a line per case and config, per architecture registers, LOCAL,
    STACK, shared bytes and tensor-core instruction (or the error)."""
    head = "".join(f" | sm{cc}: {'reg':>4} {'local':>5} {'stack':>5} {'shared':>6} {'mma':>8}"
                   for cc in CAPABILITIES)
    lines, kernel = [], None
    for job_id, (case, config) in compile_jobs().items():
        if case.kernel.__name__ != kernel:
            kernel = case.kernel.__name__
            lines += ["", kernel, f"{'case':<48} {'config':<18}{head}"]
        cells = []
        for cc in CAPABILITIES:
            r = results[f"{job_id}-sm{cc}"]
            cells.append(f"error: {r['error'][:60]}" if r["error"] else
                         f"{r['registers']!s:>10} {r['local']!s:>5} {r['stack']!s:>5} "
                         f"{r['shared']:>6} {r['mma'] or '-':>8}")
        setting = " ".join([f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items()]
                           + [f"w{config.num_warps}", f"s{config.num_stages}"])
        lines.append(f"{case.name.split('-', 1)[1]:<48} {setting:<18}"
                     + "".join(f" | {cell}" for cell in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kronops.kernels.aot", description=__doc__)
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    jobs = [(job_id, cap) for job_id in compile_jobs() for cap in CAPABILITIES]
    with ProcessPoolExecutor(max_workers=os.cpu_count(), initializer=_exit_with,
                             initargs=(os.getpid(),)) as pool:
        results = dict(pool.map(_run, jobs))
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("python -m kronops.kernels.aot needs TRITON_INTERPRET unset")
    main()
