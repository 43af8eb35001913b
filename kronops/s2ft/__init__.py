"""S²FT (structured sparse fine-tuning): select heads and channels, train only them.

``select`` makes a ``Plan``; ``apply`` wraps the selected parts of a LLaMA-style model
(adapter or in-place mode, optional co-permutation, ``unpermute``); ``InPlaceAdamW`` and
``InPlaceSGD`` train in-place mode; ``export``/``restore``/``merge``/``unmerge`` turn the
result into small tensors and back.
"""
from .apply import apply, unpermute
from .blocks import Block, find_blocks
from .export import export, merge, restore, unmerge
from .optim import InPlaceAdamW, InPlaceSGD
from .select import Plan, select

__all__ = ["select", "Plan", "apply", "unpermute", "InPlaceAdamW", "InPlaceSGD", "export",
           "restore", "merge", "unmerge", "find_blocks", "Block"]
