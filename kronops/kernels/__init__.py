"""Triton kernels of kronops, with their launchers and tuning configs.

Installed as ``kronops.kernels``, one folder per op family like the package: ``kron/``
(rows, rows_persistent, factor_grad, rows_grads), ``s2ft/`` (matmul_add, delta_grad, adamw)
and ``serving/`` (routed_kron, routed_sparse: many adapters in one launch); ``launch``
chooses configs, ``partial_sums`` sums fp32 partials in a fixed order. ``triton_<op>``
beside a kernel is the CUDA kernel of ``kronops::<op>``, taking the op's arguments (the op's
``OpSpec`` names it); ``launch_<op>`` and the other launchers take the kernel's own. Every
launcher takes CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``); arguments are
checked by the ops in ``kronops``. ``aot`` compiles every kernel the op table names.
"""
