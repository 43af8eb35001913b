"""Deprecated: the reference moved to ``kronops.testing`` (``naive_sparse_linear``) and the
PyTorch kernels to ``kronops.s2ft.torch_kernels`` (named after their ops). Kept for one
release."""
import warnings

from ..testing import naive_sparse_linear
from .torch_kernels import sparse_adamw as torch_sparse_adamw
from .torch_kernels import sparse_delta_grad as torch_sparse_delta_grad
from .torch_kernels import sparse_input_grad as torch_sparse_input_grad
from .torch_kernels import sparse_linear as torch_sparse_linear

__all__ = ["naive_sparse_linear", "torch_sparse_linear", "torch_sparse_input_grad",
           "torch_sparse_delta_grad", "torch_sparse_adamw"]

warnings.warn("kronops.s2ft.reference is deprecated: use kronops.testing "
              "(naive_sparse_linear) and kronops.s2ft.torch_kernels", DeprecationWarning,
              stacklevel=2)
