"""Triton kernels of the S²FT family: gathered GEMMs, delta gradient, in-place AdamW."""
