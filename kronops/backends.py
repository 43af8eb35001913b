"""Which implementation of an op runs: backends registered with PyTorch's dispatcher.

Every ``kronops::`` op is defined once (``torch.library.custom_op``) with its PyTorch
implementation as the default kernel, which runs on every device. ``register_triton``
adds an op's Triton launcher as its CUDA kernel; dtypes Triton does not take (fp64) still
run the PyTorch implementation there. Native CPU kernels register for "cpu" the same way.

``KRONOPS_BACKEND=composite`` (read at import) leaves CUDA on the PyTorch path too.
``triton_on_cpu()`` runs the Triton kernels on CPU tensors under ``TRITON_INTERPRET=1``:
how the tests drive the kernels through the ops and autograd without a GPU.
"""
import contextlib
import os

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_CHOICES = ("auto", "composite")

_registered = []           # (op, launcher, fallback) for every op with a Triton kernel
_cpu_registered = set()    # ops whose Triton kernel is also registered for "cpu"
_triton_devices = {"cuda"}  # device types whose tensors take the Triton kernels


def backend_choice() -> str:
    choice = os.environ.get("KRONOPS_BACKEND", "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"KRONOPS_BACKEND must be one of {BACKEND_CHOICES}, got {choice!r}")
    return choice


def import_kernels():
    """The ``kronops.kernels`` module, or None without triton (it ships with CUDA torch)."""
    try:
        from . import kernels
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        return None
    return kernels


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(launcher, fallback):
    """The registered kernel: ``launcher`` for Triton dtypes on enabled devices, else ``fallback``.

    The op's first argument is a tensor that decides (its device and dtype).
    """
    def kernel(first, *args):
        if first.dtype in TRITON_DTYPES and first.device.type in _triton_devices:
            return launcher(first, *args)
        return fallback(first, *args)
    return kernel


def register_triton(op, launcher, fallback) -> None:
    """Register ``launcher`` as ``op``'s CUDA kernel (``fallback``: its PyTorch implementation,
    for dtypes Triton does not take); nothing with ``KRONOPS_BACKEND=composite``."""
    if backend_choice() == "composite":
        return
    op.register_kernel("cuda")(_kernel(launcher, fallback))
    _registered.append((op, launcher, fallback))


@contextlib.contextmanager
def triton_on_cpu():
    """Inside, CPU tensors run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``)."""
    if not interpreting():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    for op, launcher, fallback in _registered:
        if op not in _cpu_registered:
            op.register_kernel("cpu")(_kernel(launcher, fallback))
            _cpu_registered.add(op)
    _triton_devices.add("cpu")
    try:
        yield
    finally:
        _triton_devices.discard("cpu")
