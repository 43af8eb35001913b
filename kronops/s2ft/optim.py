"""Optimizers for S²FT's in-place mode: update only the selected rows/columns of each weight.

They act on in-place layers (``S2FTInPlaceLinear``, made by ``apply_adapters(model, "s2ft",
mode="inplace")``) through ``InPlaceLayer``: the gradient is the compact
``layer.selected.grad`` ((|R|, in) or (out, |C|)), the update goes into base.weight's
selected part in place, and optimizer state is sized to that part.
The AdamW step is the op ``kronops::sparse_adamw`` (one fused Triton kernel on CUDA).

fp16/bf16 weights keep fp32 master values of the selected part (``master_weights``, on by
default for them): each step updates the master and writes it, rounded, into the weight,
so updates smaller than half the weight's rounding step accumulate instead of vanishing
(150 AdamW steps of lr 1e-4 on a bf16 weight of 1.0 move it by 0 without). The memory is
that of the selection, 4 bytes an element. The master is taken from the weight at the
first step; a weight changed outside the optimizer afterwards is overwritten by it.
"""
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..checks import check_number
from ..dtypes import accumulation_dtype
from .ops import sparse_adamw
from .selection import Selection


@runtime_checkable
class InPlaceLayer(Protocol):
    """What the in-place optimizers use of a layer (``S2FTInPlaceLinear`` has it all):

    ``selected``     the parameter whose ``.grad`` is the compact gradient of the trained part
                     ((|R|, in) or (out, |C|))
    ``base_weight``  the (out, in) weight trained in place
    ``chosen``       the ``Selection`` of its trained rows or columns
    ``weight_part()``  a copy of the trained part: where the fp32 master values start
    ``write_weight_part(values)``  write updated values (rounded) into the trained part
    """
    selected: torch.Tensor
    base_weight: torch.Tensor
    chosen: Selection

    def weight_part(self) -> torch.Tensor: ...

    def write_weight_part(self, values: torch.Tensor) -> None: ...


def _layers(model) -> list[InPlaceLayer]:
    if isinstance(model, nn.Module):
        layers = [m for m in model.modules() if isinstance(m, InPlaceLayer)]
    else:
        layers = list(model)
        for m in layers:
            if not isinstance(m, InPlaceLayer):
                raise TypeError(f"expected S2FTInPlaceLinear layers (kronops.s2ft.InPlaceLayer), "
                                f"got {type(m).__name__}")
    if not layers:
        raise ValueError("model has no S2FTInPlaceLinear layers: apply_adapters(model, 's2ft', "
                         "mode='inplace') first")
    return layers


def _non_negative(name: str, value) -> float:
    """``value`` as a float: a finite number >= 0 (torch.optim.AdamW's rule for lr, eps and
    weight_decay, which also lets infinity through; NaN fails both)."""
    value = check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _betas(betas) -> tuple[float, float]:
    """``betas`` as two floats in [0, 1)."""
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a tuple of two numbers, got {type(betas).__name__}")
    values = tuple(check_number(f"betas[{i}]", b) for i, b in enumerate(betas))
    if len(values) != 2 or not all(0.0 <= b < 1.0 for b in values):
        raise ValueError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")
    return values


class _InPlace(torch.optim.Optimizer):
    """What both in-place optimizers share: the layer behind each ``selected`` parameter
    (``layer_of``), and the fp32 master values of fp16/bf16 weights."""

    updates_in_place_selection = True  # let through by kronops.s2ft.optimizer_guard

    def __init__(self, model, defaults, master_weights: bool | None):
        if master_weights is not None and not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool or None, got {master_weights!r}")
        layers = _layers(model)
        self._layers = {m.selected: m for m in layers}
        self.master_weights = master_weights
        super().__init__([m.selected for m in layers], defaults)

    def layer_of(self, p: torch.Tensor) -> InPlaceLayer:
        """The layer whose ``selected`` parameter ``p`` is."""
        return self._layers[p]

    def _master(self, p, layer: InPlaceLayer) -> torch.Tensor | None:
        """The fp32 master values of ``p``'s submatrix (made at the first step), or None when
        the weight is fp32/fp64 or ``master_weights=False``."""
        dtype = layer.base_weight.dtype
        keep = dtype in (torch.float16, torch.bfloat16) if self.master_weights is None \
            else self.master_weights and dtype != accumulation_dtype(dtype)
        if not keep:
            return None
        state = self.state[p]
        if "master" not in state:
            state["master"] = layer.weight_part().to(torch.float32)
        return state["master"]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's loader casts floating state to the parameter's dtype (bf16/fp16 for
        ``selected``); moments and master values are kept in fp32 (fp64), so they are taken
        again from ``state_dict`` in that dtype, without a lossy round trip."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in saved:
                    self.state[p][key] = saved[key].to(
                        device=p.device, dtype=accumulation_dtype(p.dtype), copy=True)


class InPlaceSGD(_InPlace):
    """Plain SGD (no momentum): W[selection] -= lr * grad, in place (on the fp32 master values
    of fp16/bf16 weights, see the module docstring)."""

    def __init__(self, model, lr: float = 1e-3, *, master_weights: bool | None = None):
        super().__init__(model, dict(lr=_non_negative("lr", lr)), master_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = self.layer_of(p)
                master = self._master(p, layer)
                value = master if master is not None else \
                    layer.weight_part().to(accumulation_dtype(layer.base_weight.dtype))
                value.sub_(p.grad.to(value.dtype), alpha=group["lr"])
                layer.write_weight_part(value)
        return loss


class InPlaceAdamW(_InPlace):
    """AdamW (torch.optim.AdamW's update, decoupled weight decay) on the selected submatrices.

    State per layer: exp_avg and exp_avg_sq of the submatrix's shape in fp32 (fp64 for
    fp64 weights), the step, and for fp16/bf16 weights the fp32 master values.
    Weight decay applies to the submatrix only; the rest of the weight stays untouched.
    """

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, master_weights: bool | None = None):
        super().__init__(model, dict(lr=_non_negative("lr", lr), betas=_betas(betas),
                                     eps=_non_negative("eps", eps),
                                     weight_decay=_non_negative("weight_decay", weight_decay)),
                         master_weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = (group["lr"], group["betas"], group["eps"],
                                           group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                layer = self.layer_of(p)
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, device=p.device,
                                                   dtype=accumulation_dtype(p.dtype))
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state["step"] += 1
                sparse_adamw(layer.base_weight, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             self._master(p, layer), *layer.chosen.op_args, lr, beta1, beta2,
                             eps, wd, state["step"])
        return loss
