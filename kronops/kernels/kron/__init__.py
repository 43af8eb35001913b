"""Triton kernels of the Kronecker family: fused rows product and factor gradients."""
