"""Adapters on whole models, every method (KronA/LoKr, KronA^B, S²FT), every supported family.

``apply_adapters``/``merge_adapters``/``unmerge_adapters``/``trainable_parameters``/
``disable_adapters`` (``apply``): wrap, merge, unload, summarise, switch off for a while;
``methods``: one module per method (its config, how it adapts, saves, loads, merges and is
served) and the registry from a method's name to it; ``save_adapters``/``load_adapters``
(``files``), ``read_adapters`` (``fileformat``: the one adapter file format), ``atomic``:
writes that leave the old file or the new one, never half of either; ``select`` and its ``Plan`` (``selection``): which S²FT
heads and channels to train; ``find_blocks``/``Block`` (``blocks``): the transformer blocks
and the weight parts of a head or channel; ``unpermute`` (``permutation``): undo S²FT
co-permutation; ``AdapterState`` (``state``): what a model records in ``model._kronops``;
``targets``: module matching; ``lokr``: KronA-family layer settings; ``KronASublayer``
(``sublayer``): KronA^B in a model; ``peft``: PEFT LoKr interop (imports peft lazily);
``AdapterFileError`` (``errors``): a malformed adapter file or plan; ``BaseMismatchWarning``:
a file loaded into another base model than its own (``fingerprint``: how that is told).
"""
from .apply import (AdapterSummary, apply_adapters, disable_adapters, merge_adapters,
                    trainable_parameters, unmerge_adapters)
from .blocks import Block, find_blocks
from .errors import AdapterFileError, BaseMismatchWarning
from .fileformat import read_adapters
from .files import load_adapters, save_adapters
from .methods import adapter_modules
from .methods.s2ft import DEFAULT_S2FT_RATIO
from .permutation import unpermute
from .selection import Plan, select
from .state import AdapterState
from .sublayer import KronASublayer

__all__ = ["apply_adapters", "merge_adapters", "unmerge_adapters", "trainable_parameters",
           "disable_adapters", "AdapterSummary", "DEFAULT_S2FT_RATIO", "save_adapters",
           "load_adapters", "read_adapters", "AdapterFileError", "BaseMismatchWarning",
           "select", "Plan", "Block", "find_blocks", "unpermute", "AdapterState",
           "adapter_modules", "KronASublayer"]
