"""The Kronecker family: ``reference`` (PyTorch), ``ops`` (custom ops and the functional
``kron_linear``/``kron_matmul``), ``modules`` (``KronLinear``, ``KronALinear``, ``KronABlock``)."""
from .modules import KronABlock, KronALinear, KronLinear, factor_shapes
from .ops import kron_linear, kron_matmul

__all__ = ["kron_linear", "kron_matmul", "KronLinear", "KronALinear", "KronABlock",
           "factor_shapes"]
