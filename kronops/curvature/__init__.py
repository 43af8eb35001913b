"""Kronecker-factored curvature (issue 27): K-FAC factors of a model's linear and S²FT layers
(``collect``, ``LayerFactors``), a Kronecker-factored EWC penalty (``ewc_penalty``), K-FAC
preconditioning (``KFACPreconditioner``), curvature-weighted merging (``merge_models``) and
checksummed factor files (``save_factors``, ``load_factors``)."""
from .factors import LayerFactors, collect
from .files import load_factors, save_factors
from .merge import CG_TOLERANCE, merge_models
from .penalty import ewc_penalty
from .precondition import KFACPreconditioner

__all__ = ["collect", "LayerFactors", "ewc_penalty", "KFACPreconditioner", "merge_models",
           "CG_TOLERANCE", "save_factors", "load_factors"]
