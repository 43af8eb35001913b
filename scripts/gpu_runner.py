"""The KronA + S²FT model of csrc/runner compiled by AOTInductor for a device and run by the
C++ runner without Python; prints a JSON summary (exit 1 when the runner fails or disagrees).

    python scripts/gpu_runner.py OUT_DIR [--device cuda|cpu] [--json FILE]

On CUDA the model is exported with the fused paths pinned (no materialised or merged
weight), so its KronA layer and its S²FT index layer are the Triton kernels: the package
must hold them (``kernels``: the Triton kernels named in the package) and the runner, which
registers no CUDA kernel of its own, runs them (``kernels_ok``: both are named). The
runner is the native build's (``python -m kronops.native build``; ``python -m kronops.native
status`` prints it).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import zipfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc", "runner"))
import export_model  # noqa: E402

import kronops  # noqa: E402
from kronops.kron import dispatch  # noqa: E402
from kronops.native.build import runner_path  # noqa: E402
from kronops.testing import TOLERANCE, relative_error  # noqa: E402

KERNEL_NAME = re.compile(rb"(kron_\w+_kernel|sparse_\w+_kernel|routed_\w+_kernel)")


def export(out_dir: str, device: str, batch: int = 5, seq: int = 7) -> str:
    """The model on ``device`` in OUT_DIR/model.pt2; inputs.krt and expected.krt (Python's
    outputs on ``device``) beside it."""
    torch.manual_seed(0)
    model = export_model.KronS2FTModel().to(device).eval()
    x = torch.randn(batch, seq, 48, device=device)
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad(), dispatch.override(materialise=False, merge=False):
        expected = model(x)
        program = torch.export.export(model, (x,))
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(out_dir, "model.pt2"))
    export_model.write_tensors(os.path.join(out_dir, "inputs.krt"), [x])
    export_model.write_tensors(os.path.join(out_dir, "expected.krt"), [expected])
    return package


def package_kernels(package: str) -> list[str]:
    """The kronops Triton kernels named in the package's files (sorted, unique)."""
    found = set()
    with zipfile.ZipFile(package) as z:
        for name in z.namelist():
            found.update(m.decode() for m in KERNEL_NAME.findall(name.encode()))
            if name.endswith((".cpp", ".json", ".py")):
                found.update(m.decode() for m in KERNEL_NAME.findall(z.read(name)))
    return sorted(found)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    summary = dict(device=args.device, runner=runner_path(), native=kronops.native.available())
    start = time.perf_counter()
    package = export(args.out_dir, args.device)
    summary.update(export_s=round(time.perf_counter() - start, 1), kernels=package_kernels(package))
    if args.device == "cuda":  # the KronA layer's and the S²FT index layer's kernels
        needed = {"kron_rows_kernel", "sparse_matmul_add_kernel"}
        summary["kernels_ok"] = needed <= set(summary["kernels"])
    out = os.path.join(args.out_dir, "outputs.krt")
    start = time.perf_counter()
    inputs = os.path.join(args.out_dir, "inputs.krt")
    run = subprocess.run([summary["runner"], package, inputs, out], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    summary.update(run_s=round(time.perf_counter() - start, 1), returncode=run.returncode,
                   stderr=run.stderr[-2000:])
    ok = run.returncode == 0
    if ok:
        (got,) = export_model.read_tensors(out)
        (expected,) = export_model.read_tensors(os.path.join(args.out_dir, "expected.krt"))
        error = relative_error(got, expected)
        ok = got.shape == expected.shape and error <= TOLERANCE[torch.float32]
        summary.update(shape=list(got.shape), rel_error=error)
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
