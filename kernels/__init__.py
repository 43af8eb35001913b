"""Triton kernels of kronops, with their launchers and tuning configs.

Installed as ``kronops.kernels``. Every launcher takes CUDA tensors (or CPU tensors
under ``TRITON_INTERPRET=1``) and returns new tensors; shapes are checked by the
callers in ``kronops``.
"""
from .kron_factor_grad import kron_factor_grad
from .kron_rows import kron_rows

__all__ = ["kron_rows", "kron_factor_grad"]
