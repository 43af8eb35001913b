"""kronops: fast, exact Kronecker-product and structured-sparse (S²FT) adapters for PyTorch.

One folder per op family, each read top to bottom (``torch_kernels`` -> ``ops`` -> ``modules``):
``kronops.kron`` (``kron_linear``, ``kron_matmul``, ``KronLinear``, ``KronALinear``,
``KronABlock``) and ``kronops.s2ft`` (``Selection``, ``sparse_linear``, ``S2FTLinear``,
``S2FTInPlaceLinear``, ``InPlaceAdamW``, ``InPlaceSGD``). Whole models, both methods: ``kronops.adapters``
(``apply_adapters``, ``merge_adapters``, ``unmerge_adapters``, ``trainable_parameters``,
``disable_adapters``, ``save_adapters``, ``load_adapters``, S²FT ``select``, PEFT interop).
Serving many adapters on one base model in mixed batches: ``kronops.serving.AdapterBank``.
Kronecker-factored curvature (K-FAC factors, Kronecker-factored EWC): ``kronops.curvature``.
Backends: ``kronops.backends``.
"""
from . import adapters, backends, curvature, kron, s2ft, serving
from .adapters import (AdapterFileError, AdapterSummary, BaseMismatchWarning, apply_adapters,
                       disable_adapters, load_adapters, merge_adapters, save_adapters,
                       trainable_parameters, unmerge_adapters)
from .kron import KronABlock, KronALinear, KronLinear, kron_linear, kron_matmul
from .s2ft import (InPlaceAdamW, InPlaceSGD, S2FTInPlaceLinear, S2FTLinear, Selection,
                   sparse_linear)
from .version import __version__

__all__ = ["kron_linear", "kron_matmul", "KronLinear", "KronALinear", "KronABlock",
           "Selection", "sparse_linear", "S2FTLinear", "S2FTInPlaceLinear", "InPlaceAdamW", "InPlaceSGD",
           "apply_adapters", "merge_adapters", "unmerge_adapters", "trainable_parameters",
           "disable_adapters", "AdapterSummary", "save_adapters", "load_adapters",
           "AdapterFileError", "BaseMismatchWarning", "adapters", "backends", "curvature", "kron", "s2ft",
           "serving",
           "__version__"]
