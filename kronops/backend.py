"""Which implementation runs: the Triton kernels on CUDA, the composite PyTorch path elsewhere.

Set ``KRONOPS_BACKEND=composite`` to use the PyTorch path on CUDA too. Under
``TRITON_INTERPRET=1``, ``KRONOPS_BACKEND=triton`` runs the Triton kernels on CPU
tensors (slow; how CI tests the kernels through the ops and autograd).
"""
import functools
import os

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs the Triton kernels."""
    choice = os.environ.get("KRONOPS_BACKEND", "auto")
    if choice not in ("auto", "triton", "composite"):
        raise ValueError(f"KRONOPS_BACKEND must be auto, triton or composite, got {choice!r}")
    if choice == "composite" or t.dtype not in TRITON_DTYPES or not triton_available():
        return False
    if t.is_cuda:
        return True
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return choice == "triton" and interpreting and t.device.type == "cpu"
