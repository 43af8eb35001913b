"""The S²FT family: ``selection`` (``Selection``: the rows or columns trained),
``torch_kernels`` (PyTorch), ``ops`` (custom ops and the functional ``sparse_linear``),
``modules`` (``S2FTLinear``, ``S2FTInPlaceLinear``) and ``optim`` (``InPlaceAdamW``,
``InPlaceSGD`` for in-place training, through ``InPlaceLayer``)."""
from .modules import S2FTInPlaceLinear, S2FTLinear
from .ops import sparse_linear
from .optim import InPlaceAdamW, InPlaceLayer, InPlaceSGD
from .selection import Selection

__all__ = ["sparse_linear", "Selection", "S2FTLinear", "S2FTInPlaceLinear", "InPlaceAdamW",
           "InPlaceSGD", "InPlaceLayer"]
