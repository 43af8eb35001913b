"""Deprecated: the references moved to ``kronops.testing`` (``naive_*``) and the PyTorch
kernels to ``kronops.kron.torch_kernels`` (named after their ops). Kept for one release."""
import warnings

from ..testing import naive_kron, naive_kron_linear, naive_kron_matmul
from .torch_kernels import b_first, kron
from .torch_kernels import kron_factor_grad as torch_kron_factor_grad
from .torch_kernels import kron_rows as torch_kron_rows
from .torch_kernels import kron_rows_grads as torch_kron_rows_grads

__all__ = ["naive_kron", "naive_kron_linear", "naive_kron_matmul", "kron", "b_first",
           "torch_kron_rows", "torch_kron_factor_grad", "torch_kron_rows_grads"]

warnings.warn("kronops.kron.reference is deprecated: use kronops.testing (naive_*) and "
              "kronops.kron.torch_kernels", DeprecationWarning, stacklevel=2)
