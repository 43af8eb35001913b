"""kronops: fast, exact Kronecker-product and structured-sparse (S²FT) adapters for PyTorch.

Functional ops: ``kron_linear``, ``kron_matmul``, ``sparse_linear``. Modules: ``KronLinear``,
``KronALinear``, ``KronABlock``, ``S2FTLinear``. S²FT selection, model application and
in-place training: ``kronops.s2ft``. Reference implementations: ``kronops.kron_reference``,
``kronops.sparse_reference``.
"""
from . import s2ft
from .kron_functional import kron_linear, kron_matmul
from .kron_modules import KronABlock, KronALinear, KronLinear
from .sparse_functional import sparse_linear
from .sparse_modules import S2FTLinear

__version__ = "0.1.0"
__all__ = ["kron_linear", "kron_matmul", "KronLinear", "KronALinear", "KronABlock",
           "sparse_linear", "S2FTLinear", "s2ft"]
