"""Test set-up: Triton kernels run in the CPU interpreter unless a CUDA GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import kronops  # noqa: E402
from kronops.testing import TOLERANCE, assert_close  # noqa: E402,F401  (the one error rule)
from kronops.testing import relative_error as rel_err  # noqa: E402,F401

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


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, with the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield seed
