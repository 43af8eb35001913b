"""Which implementation of an op runs: backends registered with PyTorch's dispatcher.

Every ``kronops::`` op is defined once (``torch.library.custom_op``, its schema from
``kronops.native.schemas``) with its PyTorch implementation as the default kernel, which
runs on every device. ``register_triton`` adds an op's Triton launcher as its CUDA kernel;
dtypes Triton does not take (fp64) still run the PyTorch implementation there. The native
library (``kronops.native``, when built) registers its C++ kernels for the CPU dispatch key
of every op in the schema table, once all of them are defined (``defined``).

``KRONOPS_BACKEND=composite`` (read at import) leaves CUDA on the PyTorch path too;
``KRONOPS_NATIVE=0`` leaves CPU on it. ``triton_on_cpu()`` runs the Triton kernels on CPU
tensors under ``TRITON_INTERPRET=1``: how the tests drive the kernels through the ops and
autograd without a GPU.
"""
import contextlib
import os

import torch

from . import native

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_CHOICES = ("auto", "composite")

_registered = []           # (op, launcher, fallback) for every op with a Triton kernel
_cpu_registered = set()    # ops whose Triton kernel is also registered for "cpu"
_triton_devices = {"cuda"}  # device types whose tensors take the Triton kernels
_defined = set()           # ops of the schema table defined so far


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


def custom_op(name: str, fn, mutates_args=()):
    """The custom op ``kronops::name``, its schema from ``kronops.native.schemas`` and ``fn``
    (the PyTorch implementation) as its default kernel on every device."""
    qualname = f"kronops::{name}"
    return torch.library.custom_op(qualname, fn, mutates_args=mutates_args,
                                   schema=native.schema(qualname))


def defined(*ops) -> None:
    """Note ``ops`` (custom ops of the schema table) as defined; once all are, load the
    native library (its kernels are checked against the schemas as they register)."""
    _defined.update(op._qualname for op in ops)
    if _defined.issuperset(native.op_names()):
        native.load()


def recomputes_intermediate(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the Kronecker kernels for these tensors recompute X·Bᵀ in their backward
    (native: in cache, per block of rows; Triton: on chip) rather than keep it from the
    forward, as the PyTorch kernels do (``kron_rows_keep``), like autograd would."""
    if device_type == "cpu" and native.active():
        return True
    return bool(_registered) and device_type in _triton_devices and dtype in TRITON_DTYPES


@contextlib.contextmanager
def triton_on_cpu():
    """Inside, CPU tensors run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``);
    the native kernels, registered for CPU ahead of them, are set aside meanwhile."""
    if not interpreting():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    for op, launcher, fallback in _registered:
        if op not in _cpu_registered:
            op.register_kernel("cpu")(_kernel(launcher, fallback))
            _cpu_registered.add(op)
    with native.disabled():
        _triton_devices.add("cpu")
        try:
            yield
        finally:
            _triton_devices.discard("cpu")
