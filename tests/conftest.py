"""Test set-up: Triton kernels run in the CPU interpreter unless a CUDA GPU is present.

Tests that run the Triton kernels (through ``triton_backend``, a parameter "triton" or
"inductor", or on ``KERNEL_DEVICE`` / ``KERNEL_DTYPES`` / ``ON_GPU``; every kernel test but
the ahead-of-time compiles) are marked ``kernels``: ``-m kernels`` is what a GPU runs
differently from CPU (scripts/gpu_validate.py, stage 1).

Every test starts from a fixed seed derived from its node id, so a run is reproducible and
CI cannot fail at random. ``KRONOPS_TEST_SEED=k`` shifts every seed (a sweep over k
checks that tolerances hold for other inputs too); ``KRONOPS_MARGINS=path`` appends one
JSON line per ``assert_close`` (test, what, error / tolerance) to ``path``.
"""
import inspect
import json
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import kronops  # noqa: E402
from kronops.testing import TOLERANCE  # noqa: E402  (the one error rule)
from kronops.testing import relative_error as rel_err  # noqa: E402

ON_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 tl.dot is broken in the Triton interpreter (values stored as uint16): GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


@pytest.fixture
def triton_backend():
    """Route the ops through their Triton kernels (the interpreter's, on CPU tensors)."""
    if ON_GPU:
        yield
        return
    with kronops.backends.triton_on_cpu():
        yield


@pytest.fixture(params=["torch", "triton"])
def backend_device(request):
    """Each backend in turn, as the device its tensors go on: the PyTorch default kernels
    (CPU), then the Triton kernels (CUDA, or CPU through the interpreter)."""
    if request.param == "torch":
        yield "cpu"
    elif ON_GPU:
        yield "cuda"
    else:
        with kronops.backends.triton_on_cpu():
            yield "cpu"


KERNEL_NAMES = ("KERNEL_DEVICE", "KERNEL_DTYPES", "ON_GPU")
KERNEL_PARAMS = ("triton", "inductor")  # backend parameters that run the Triton kernels


def runs_kernels(item) -> bool:
    """Whether a collected test runs the Triton kernels (see the module docstring)."""
    path = str(item.path)
    if os.sep + "kernels" + os.sep in path and not path.endswith("test_aot_compile.py"):
        return True
    if "triton_backend" in item.fixturenames:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(v in KERNEL_PARAMS for v in callspec.params.values()
                                    if isinstance(v, str)):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        source = ""
    return any(name in source for name in KERNEL_NAMES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if runs_kernels(item):
            item.add_marker(pytest.mark.kernels)


@pytest.fixture(autouse=True)
def _fused_paths(request):
    """Every test runs the fused Kronecker kernels at every size: the rules that build small
    products, merge the adapter into the weight or group factors (``kronops.kron.dispatch``)
    are pinned off, except in tests marked ``dispatch_rules``, which test them and their paths."""
    if request.node.get_closest_marker("dispatch_rules"):
        yield
        return
    with kronops.kron.dispatch.override(materialise=False, merge=False, group=False):
        yield


_current_test = [""]


def assert_close(out, ref, dtype: torch.dtype, what: str = "", magnitude: float | None = None):
    """``kronops.testing``'s rule: relative error within ``TOLERANCE[dtype]``; the margin is
    recorded when ``KRONOPS_MARGINS`` names a file."""
    err = rel_err(out, ref, magnitude)
    margins = os.environ.get("KRONOPS_MARGINS")
    if margins:
        with open(margins, "a") as f:
            f.write(json.dumps(dict(test=_current_test[0], what=what, dtype=str(dtype),
                                    ratio=err / TOLERANCE[dtype])) + "\n")
    assert err <= TOLERANCE[dtype], \
        f"{what} relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """A seed fixed per test (its node id), shifted by ``KRONOPS_TEST_SEED``; printed on failure."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("KRONOPS_TEST_SEED", "0"))
    torch.manual_seed(seed)
    _current_test[0] = request.node.nodeid
    print(f"torch seed {seed}")
    yield seed
