"""The ops' dtype rules: what gradients accumulate in, and torch.autocast.

Custom ops are opaque to autocast, so the public functions cast their floating operands
to the autocast dtype themselves (as F.linear is cast), and the composite implementations
run with autocast off, so that what an op returns always matches its fake implementation.
"""
import contextlib

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What reductions (factor and delta gradients, optimizer state) accumulate in:
    fp64 stays fp64, everything else (fp32, fp16, bf16) uses fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def composite_dtype(t: torch.Tensor) -> torch.dtype:
    """What the PyTorch (composite) Kronecker kernels compute in for inputs like ``t``: fp32
    for fp16 (its intermediate X·Bᵀ can overflow where the whole product does not) and for
    bf16 on CPU (which has no fast half-precision batched GEMMs; bench/NOTES.md has the
    timing); the input's own dtype otherwise."""
    if t.dtype == torch.float16 or (t.dtype == torch.bfloat16 and t.device.type == "cpu"):
        return torch.float32
    return t.dtype


def kept_dtype(t: torch.Tensor) -> torch.dtype:
    """What the Kronecker forward keeps its intermediate (X·Bᵀ or A·X) in for its backward,
    for inputs like ``t``: bf16 stays bf16 (its range is fp32's; rounding the kept values once
    adds one rounding of 2⁻⁸ to the gradients, within the bf16 bound, and halves what is kept),
    every other dtype ``composite_dtype``."""
    return t.dtype if t.dtype == torch.bfloat16 else composite_dtype(t)


def compute_dtype(device_type: str, t: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``t`` computes in: the autocast dtype when autocast is on for
    ``device_type``, else ``t``'s."""
    if device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return t.dtype


def autocast_operands(device_type: str, *tensors):
    """``tensors`` (None kept) in the autocast dtype when autocast is on for ``device_type``."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_off(device_type: str):
    """A context in which ops on ``device_type`` run in their own dtypes (a no-op context
    when autocast is off already: entering torch.autocast costs ~20 us of host time)."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)
