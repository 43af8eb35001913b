"""Triton kernels of kronops, with their launchers (``triton_<op>``) and tuning configs.

Installed as ``kronops.kernels``, one folder per op family like the package:
``kron/`` (rows, rows_persistent, factor_grad, rows_grads), ``s2ft/`` (matmul_add, delta_grad, adamw) and
``serving/`` (routed_kron, routed_sparse: many adapters in one launch); ``launch``
chooses configs. Every launcher takes CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``); shapes are checked by the ops in ``kronops``.
"""
from .kron.factor_grad import triton_kron_factor_grad
from .kron.rows import triton_kron_rows
from .kron.rows_grads import fits as kron_rows_grads_fits
from .kron.rows_grads import triton_kron_rows_grads_one_pass
from .kron.rows_persistent import fits as kron_rows_persistent_fits
from .kron.rows_persistent import triton_kron_rows_persistent
from .s2ft.adamw import triton_sparse_adamw
from .s2ft.delta_grad import triton_sparse_delta_grad
from .s2ft.matmul_add import triton_sparse_matmul_add
from .serving.routed_kron import triton_routed_kron_add
from .serving.routed_sparse import triton_routed_sparse_add

__all__ = ["triton_kron_rows", "triton_kron_factor_grad", "triton_kron_rows_grads_one_pass",
           "kron_rows_grads_fits", "triton_kron_rows_persistent", "kron_rows_persistent_fits",
           "triton_sparse_matmul_add", "triton_sparse_delta_grad", "triton_sparse_adamw",
           "triton_routed_kron_add", "triton_routed_sparse_add"]
