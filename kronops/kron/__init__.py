"""The Kronecker family: ``torch_kernels`` (PyTorch), ``ops`` (custom ops and the functional
``kron_linear``/``kron_matmul``), ``dispatch`` (when products are built), ``merged``
(``kron_linear_merged``), ``summed`` (``kron_linear_summed``), ``modules`` (``KronLinear``,
``KronALinear``, ``KronABlock``)."""
from .modules import KronABlock, KronALinear, KronLinear, factor_shapes
from .merged import kron_linear_merged
from .summed import kron_linear_summed
from .ops import kron_linear, kron_matmul

__all__ = ["kron_linear", "kron_matmul", "kron_linear_merged", "kron_linear_summed",
           "KronLinear", "KronALinear", "KronABlock", "factor_shapes"]
