"""Counting host reads of tensor values made while kronops code runs.

A host read is anything that needs a tensor's values (or a size that depends on them) in
Python: ``item``, ``tolist``, ``numpy``, ``bool``/``int``/``float``/``index`` of a tensor,
``nonzero``, ``unique``, ``masked_select``, ``torch.equal``. On CUDA each one synchronises
with the device; on CPU it is a read the ops' Python layers make per call. ``host_reads()``
patches them on ``torch.Tensor`` (and ``torch``) for its duration and counts the calls made
with a ``kronops`` frame on the stack (so torch.optim's own reads of its step counters, or
the test's, are not counted); a read inside another counted read counts once.
"""
import collections
import contextlib
import os
import sys
import threading

import torch

import kronops

PACKAGE = os.path.dirname(os.path.abspath(kronops.__file__)) + os.sep
ROOT = os.path.dirname(os.path.dirname(PACKAGE))
TENSOR_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__",
                "__complex__", "__array__", "nonzero", "unique", "masked_select")
TORCH_READS = ("equal", "nonzero", "unique", "masked_select")


class HostReads:
    """The counted reads: ``count``, and ``where`` (a Counter of "file:line name" of the
    innermost kronops frame of each)."""

    def __init__(self):
        self.where = collections.Counter()
        self._local = threading.local()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if getattr(self._local, "inside", False):
                return fn(*args, **kwargs)
            self._local.inside = True
            try:
                frame = sys._getframe(1)
                while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                    frame = frame.f_back
                if frame is not None:
                    where = os.path.relpath(frame.f_code.co_filename, ROOT)
                    self.where[f"{where}:{frame.f_lineno} {name}"] += 1
                return fn(*args, **kwargs)
            finally:
                self._local.inside = False
        return counted


@contextlib.contextmanager
def host_reads():
    """Count host reads made by kronops code inside the block (``HostReads``)."""
    reads = HostReads()
    saved = [(owner, name, vars(owner).get(name))
             for owner, names in ((torch.Tensor, TENSOR_READS), (torch, TORCH_READS))
             for name in names]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, reads._wrap(name, getattr(owner, name)))
        yield reads
    finally:
        for owner, name, own in saved:
            if own is None:  # inherited from torch._C.TensorBase
                delattr(owner, name)
            else:
                setattr(owner, name, own)
