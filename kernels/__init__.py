"""Triton kernels of kronops, with their launchers and tuning configs.

Installed as ``kronops.kernels``. Every launcher takes CUDA tensors (or CPU tensors
under ``TRITON_INTERPRET=1``) and returns new tensors (``sparse_matmul_add`` and
``sparse_adamw`` update their first arguments in place); shapes are checked by the
callers in ``kronops``.
"""
from .kron_factor_grad import kron_factor_grad
from .kron_rows import kron_rows
from .sparse_adamw import sparse_adamw
from .sparse_delta_grad import sparse_delta_grad
from .sparse_linear import sparse_matmul_add

__all__ = ["kron_rows", "kron_factor_grad", "sparse_matmul_add", "sparse_delta_grad",
           "sparse_adamw"]
