"""Kronecker-factored curvature (issue 27): K-FAC factors of a model's linear and S²FT layers
(``collect``, ``LayerFactors``)."""
from .factors import LayerFactors, collect

__all__ = ["collect", "LayerFactors"]
