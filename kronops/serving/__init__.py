"""Serving many fine-tuned adapters on one base model: ``AdapterBank``.

``bank``: load/unload adapter files, route mixed batches, merge/unmerge; ``layers``: what
the bank keeps per adapted layer; ``routes``: batch rows to token groups and tile tables;
``ops``: ``routed_kron_add`` and ``routed_sparse_add``, every adapter of a layer in one call.
"""
from .bank import AdapterBank

__all__ = ["AdapterBank"]
