"""Kronecker-factored curvature (issue 27): K-FAC factors of a model's linear and S²FT layers
(``collect``, ``LayerFactors``) and a Kronecker-factored EWC penalty (``ewc_penalty``)."""
from .factors import LayerFactors, collect
from .penalty import ewc_penalty

__all__ = ["collect", "LayerFactors", "ewc_penalty"]
