"""Every kernel, dtype and launchable config compiles ahead of time for sm_80 and sm_90.

The interpreter accepts kernels a GPU compiler rejects, so this is what catches them.
Fails on a compile error, on register spills (cuobjdump's LOCAL, or a STACK frame larger
than the few words ptxas reserves even at low register counts), on shared memory over the
architecture's limit, and on a tensor-core dot that did not become MMA.
"""
import json
import os
import subprocess
import sys

import pytest

from kronops.kernels.aot import CAPABILITIES, compile_jobs

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block, opt-in maximum
# Bytes of stack frame tolerated: seen at 8-24 bytes with 40-128 registers (triton 3.9), and
# 40 bytes at 128 registers for one 8-warp fp32/tf32 config (triton 3.6, H100) -- frames
# ptxas keeps without register pressure. Real spills are hundreds of bytes.
STACK_LIMIT = 48


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kronops.kernels.aot"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return {r["key"]: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("job_id", list(compile_jobs()))
def test_compiles_without_spills(compiled, job_id, capability):
    result = compiled[f"{job_id}-sm{capability}"]
    assert result["error"] is None, result["error"]
    assert result["shared"] <= SHARED_LIMIT[capability], f"{result['shared']} bytes of shared memory"
    assert result["stack"] <= STACK_LIMIT and result["local"] == 0, f"spills: {result}"
    if not job_id.rsplit("-cfg", 1)[0].endswith(("ieee", "nodot")):
        assert result["tensor_cores"], "the dot did not compile to tensor-core MMA"
