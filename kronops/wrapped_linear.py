"""The linear layers adapters wrap: ``nn.Linear`` (weight (out, in)) and transformers' GPT-2
``Conv1D`` (the same map with its weight stored transposed, (in, out)).

``out_in_weight(layer)`` is the (out, in) weight either way, a view of the stored tensor
(never a copy): ops and in-place updates take it with its strides, so writes through it
land in the layer's own weight. ``WrapsLinear`` gives an adapter over ``self.base`` its
``in_features``, ``out_features`` and ``base_weight``.
"""
import torch
from torch import nn


def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2 style, y = x @ weight + bias with weight (in, out)),
    recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
        isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_linear(module) -> bool:
    """Whether ``module`` is a linear layer adapters can wrap (nn.Linear or Conv1D)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def check_linear(name: str, module) -> None:
    """TypeError unless ``module`` is an nn.Linear or a transformers Conv1D."""
    if not is_linear(module):
        raise TypeError(f"{name} must be an nn.Linear or a transformers Conv1D, got "
                        f"{type(module).__name__}")


def out_in_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features): the Parameter itself for nn.Linear,
    its transposed view for Conv1D."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def as_out_in(layer: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``layer.weight`` (e.g. its .grad), viewed as (out, in)."""
    return t.T if is_conv1d(layer) else t


def features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D, or of an adapter over one."""
    if not is_linear(layer):
        return layer.in_features, layer.out_features
    w = out_in_weight(layer)
    return w.shape[1], w.shape[0]


class WrapsLinear:
    """``in_features``, ``out_features`` and the (out, in) ``base_weight`` of ``self.base``;
    ``weight`` and ``bias`` are base's own (as stored), for model code that reads them off
    the layer it called (T5's FFN checks ``wo.weight.dtype``)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return features(self.base)[0]

    @property
    def out_features(self) -> int:
        return features(self.base)[1]

    @property
    def base_weight(self) -> torch.Tensor:
        """base's weight as (out, in) (a transposed view for Conv1D)."""
        return out_in_weight(self.base)
