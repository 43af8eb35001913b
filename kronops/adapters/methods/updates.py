"""What one adapter adds to one linear layer, in the two forms the serving ops run. A method's
``serve`` hook describes its adapters in these forms; ``AdapterBank`` stacks them per layer
(``kronops.serving.layers``), so the bank itself knows no method.

``KronUpdate``   y += x @ kron(a, b).T (the adapter's scale folded into b), x the layer's own
                 input or, with ``source``, the input of that module (KronA^B: the
                 sub-layer's first projection), plus ``residual`` * x (KronA^B_res's s_res).
``SparseUpdate`` the (out, in) weight with ``delta`` added into the rows (delta (|R|, in)) or
                 columns (delta (out, |C|)) of its ``selection``.
All tensors in the layer's weight dtype, on its device.
"""
from dataclasses import dataclass

import torch

from ...s2ft.selection import Selection


@dataclass(frozen=True)
class KronUpdate:
    """y += x_source @ kron(a, b).T (+ residual * x_source): see the module docstring."""
    a: torch.Tensor
    b: torch.Tensor
    source: str | None = None
    residual: torch.Tensor | None = None


@dataclass(frozen=True)
class SparseUpdate:
    """W[selection] += delta: see the module docstring."""
    selection: Selection
    delta: torch.Tensor
