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

# Names that moved to kronops.adapters (model-level S²FT) unchanged: kept here for one release.
_MOVED_TO_ADAPTERS = ("select", "Plan", "unpermute", "find_blocks", "Block")


def __getattr__(name: str):
    if name in _MOVED_TO_ADAPTERS:
        import warnings

        from .. import adapters
        warnings.warn(f"kronops.s2ft.{name} moved to kronops.adapters.{name}; the old name "
                      "goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(adapters, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
