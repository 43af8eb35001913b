"""kronops: fast, exact Kronecker-product adapters for PyTorch.

Functional ops: ``kron_linear``, ``kron_matmul``. Modules: ``KronLinear``,
``KronALinear``, ``KronABlock``. Reference implementations: ``kronops.kron_reference``.
"""
from .kron_functional import kron_linear, kron_matmul
from .kron_modules import KronABlock, KronALinear, KronLinear

__version__ = "0.1.0"
__all__ = ["kron_linear", "kron_matmul", "KronLinear", "KronALinear", "KronABlock"]
