"""kronops: fast, exact Kronecker-product and structured-sparse (S²FT) adapters for PyTorch.

Functional ops: ``kron_linear``, ``kron_matmul``, ``sparse_linear``. Modules: ``KronLinear``,
``KronALinear``, ``KronABlock``, ``S2FTLinear``. S²FT selection, model application and
in-place training: ``kronops.s2ft``. Whole models: ``apply_adapters``, ``merge_adapters``,
``unmerge_adapters``, ``save_adapters``, ``load_adapters``; PEFT LoKr: ``kronops.peft_interop``.
Reference implementations: ``kronops.kron_reference``, ``kronops.sparse_reference``.
"""
from . import s2ft
from .adapter_io import load_adapters, save_adapters
from .integration import apply_adapters, merge_adapters, unmerge_adapters
from .kron_functional import kron_linear, kron_matmul
from .kron_modules import KronABlock, KronALinear, KronLinear
from .sparse_functional import sparse_linear
from .sparse_modules import S2FTLinear

__version__ = "0.1.0"
__all__ = ["kron_linear", "kron_matmul", "KronLinear", "KronALinear", "KronABlock",
           "sparse_linear", "S2FTLinear", "s2ft", "apply_adapters", "merge_adapters",
           "unmerge_adapters", "save_adapters", "load_adapters"]
