"""Every kernel, dtype and launchable config compiles ahead of time for sm_80 and sm_90.

The interpreter accepts kernels a GPU compiler rejects, so this is what catches them.
Fails on a compile error, on register spills (cuobjdump's LOCAL, or a STACK frame larger
than the few words ptxas reserves even at low register counts), on shared memory over the
architecture's limit, and on a tensor-core dot that did not become MMA. The compile must
specialise arguments as triton's launcher does, or it checks code that never runs.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend

from kronops.kernels.aot import CAPABILITIES, DIVISIBLE, compile_jobs, int_specialisation

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block, opt-in maximum
# Bytes of stack frame tolerated: seen at 8-24 bytes with 40-128 registers (triton 3.9), and
# 40 bytes at 128 registers for one 8-warp fp32/tf32 config (triton 3.6, H100) -- frames
# ptxas keeps without register pressure. Real spills are hundreds of bytes.
STACK_LIMIT = 48
COMPILER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
# A compile takes 0.2-1 s on one core of the CI machine; 3 s each leaves room for a loaded one.
SECONDS_PER_COMPILE = 3


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    compiles = len(compile_jobs()) * len(CAPABILITIES)
    out = subprocess.run([sys.executable, "-m", "kronops.kernels.aot", "--out", str(path)],
                         env=COMPILER_ENV, capture_output=True, text=True,
                         timeout=max(300, SECONDS_PER_COMPILE * compiles / (os.cpu_count() or 1)))
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(path.read_text())


def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")
def test_compile_workers_do_not_outlive_their_parent(tmp_path):
    """Killing the compile (as a time limit does: SIGKILL, no cleanup) ends its workers too."""
    parent = subprocess.Popen([sys.executable, "-m", "kronops.kernels.aot", "--out",
                               str(tmp_path / "aot.json")], env=COMPILER_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (workers := _children(parent.pid)) and time.monotonic() < deadline:
            assert parent.poll() is None, "the compile ended before starting its workers"
            time.sleep(0.2)
        assert workers, "no compile worker started"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), "compile workers outlived their parent"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of its group
            os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("job_id", list(compile_jobs()))
def test_compiles_without_spills(compiled, job_id, capability):
    result = compiled[f"{job_id}-sm{capability}"]
    assert result["error"] is None, result["error"]
    assert result["shared"] <= SHARED_LIMIT[capability], f"{result['shared']} bytes of shared memory"
    assert result["stack"] <= STACK_LIMIT and result["local"] == 0, f"spills: {result}"
    if not job_id.rsplit("-cfg", 1)[0].endswith(("ieee", "nodot")):
        assert result["mma"], "the dot did not compile to tensor-core MMA"


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_specialisation_is_the_launchers(capability):
    """Integers and pointers get the type and attributes triton's launcher gives them
    (its own function, with the CUDA backend of the target)."""
    backend = make_backend(GPUTarget("cuda", capability, 32))
    for value in [0, 1, 2, 15, 16, 17, 48, 205, 4096, -16, -1, 2 ** 31 - 16, 2 ** 31, 2 ** 32 + 3]:
        kind, key = native_specialize_impl(backend, value, False, True, True)
        launched = (kind, []) if kind == "constexpr" else (kind, backend.parse_attr(key))
        assert int_specialisation(value) == launched, value
    pointer = torch.empty(8, dtype=torch.float16, device="meta")  # data_ptr 0: aligned
    kind, key = native_specialize_impl(backend, pointer, False, True, True)
    assert (kind, backend.parse_attr(key)) == ("*fp16", DIVISIBLE)


PROBE = """
import dataclasses, json, re, sys
from kronops.kernels.aot import compile_jobs, compile_kernel
case, config = compile_jobs()[sys.argv[1]]
out = {}
for name, c in [("launch", case), ("undeclared", dataclasses.replace(case, ints={}))]:
    k = compile_kernel(c, config, 90)
    head = next(line for line in k.asm["ttir"].splitlines() if "tt.func" in line)
    out[name] = dict(args=re.findall(r"%(\\w+):", head),
                     divisible=re.findall(r"%(\\w+): [^{,]*\\{tt.divisibility = 16", head),
                     cp_async="cp.async" in k.asm["ptx"])
print(json.dumps(out))
"""


def test_launch_values_reach_the_compiled_code():
    """The 16x16x16x16 fp16 forward as launched: unit strides are constants, pointers and the
    multiples of 16 are divisible, and its tiles load by cp.async; with its integer values
    undeclared the same kernel loads 2 bytes at a time (what the compile built before)."""
    job = "kron_rows-fwd-bias0-16x16x16x16-fp16-tf32-cfg0"
    out = subprocess.run([sys.executable, "-c", PROBE, job], env=COMPILER_ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    launch, undeclared = json.loads(out.stdout)["launch"], json.loads(out.stdout)["undeclared"]
    case, _ = compile_jobs()[job]
    units = [k for k, v in case.ints.items() if v == 1]
    assert units and not set(units) & set(launch["args"])
    assert set(units) <= set(undeclared["args"])
    pointers = [a for a in launch["args"] if a.endswith("_ptr")]
    assert set(launch["divisible"]) == set(pointers) | {a for a, v in case.ints.items()
                                                        if v % 16 == 0}
    assert undeclared["divisible"] == pointers
    assert launch["cp_async"] and not undeclared["cp_async"]
