"""Refusing S²FT in-place parameters to optimizers that cannot update them.

An ``S2FTInPlaceLinear``'s ``selected`` parameter is an expanded zero (no memory): a
torch.optim optimizer would fail inside its step with "more than one element of the
written-to tensor refers to a single memory location". ``guard`` installs, once per
process, an optimizer step pre-hook that raises a clear ValueError at the first step of
any optimizer holding such a parameter (zero strides), before anything changes; optimizers
whose class sets ``updates_in_place_selection = True`` (``InPlaceAdamW``, ``InPlaceSGD``)
are let through. Each optimizer is checked once, and again when its parameter groups change.
"""
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_checked = weakref.WeakKeyDictionary()  # optimizer -> parameter counts it was checked at
_hook = None


def _expanded(p: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for stride, size in zip(p.stride(), p.shape))


def _refuse(optimizer, args, kwargs) -> None:
    if getattr(type(optimizer), "updates_in_place_selection", False):
        return
    key = tuple(len(g["params"]) for g in optimizer.param_groups)
    if _checked.get(optimizer) == key:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if _expanded(p):
                raise ValueError(
                    f"{type(optimizer).__name__} was given an S²FT in-place parameter of shape "
                    f"{tuple(p.shape)} (a layer's `selected`: an expanded zero standing for the "
                    "selected rows/columns of the weight, which torch.optim optimizers cannot "
                    "update). Use kronops.InPlaceAdamW(model) or kronops.InPlaceSGD(model) for "
                    "them and give other optimizers only the other parameters, e.g. "
                    "[p for n, p in model.named_parameters() if p.requires_grad and not "
                    "n.endswith('.selected')]; or use mode='adapter' with any optimizer")
    _checked[optimizer] = key


def guard() -> None:
    """Install the step pre-hook (once per process)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_refuse)
