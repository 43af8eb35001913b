"""Argument checks shared by the public ops: clear TypeError/ValueError naming the argument."""
import math

import torch


def check_tensor(name: str, t, *, dim: int | None = None,
                 nonempty: bool = False) -> torch.Tensor:
    """``t`` must be a floating-point tensor (of ``dim`` dimensions when given; with
    ``nonempty``, with no zero-size dimension)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must have no zero-size dimension, got shape {tuple(t.shape)}")
    return t


def check_features(name: str, x: torch.Tensor, features: int) -> None:
    """``x`` has a last dimension of ``features`` (a layer's in_features)."""
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{name} must have last dim in_features = {features}, "
                         f"got shape {tuple(x.shape)}")


def check_same(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in ``others`` (None skipped) shares ``reference``'s device and dtype."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {reference_name} has {reference.dtype}")


def check_number(name: str, value) -> float:
    """``value`` is a finite real Python number (an int or float, not a bool); returns it as
    a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_scale(scale) -> float:
    """``scale`` is a finite real Python number; returns it as a float."""
    return check_number("scale", scale)


class OpChecks:
    """Checks of one ``kronops::`` op's arguments, for kernels called directly: worded as the
    native kernels' (csrc/checks.cpp), every message starts with the op's name and names the
    argument, the value given and the one expected."""

    def __init__(self, op: str):
        self.op = op

    def value_error(self, message: str) -> ValueError:
        return ValueError(f"{self.op}: {message}")

    def type_error(self, message: str) -> TypeError:
        return TypeError(f"{self.op}: {message}")

    def floating(self, name: str, t: torch.Tensor) -> None:
        """``t`` is a floating-point tensor."""
        if not t.is_floating_point():
            raise self.type_error(f"{name} must be a floating-point tensor, got {t.dtype}")

    def on(self, name: str, t: torch.Tensor, device: torch.device) -> None:
        """``t`` is on ``device``."""
        if t.device != device:
            raise self.value_error(f"{name} must be on {device}, got {t.device}")

    def like(self, name: str, t: torch.Tensor, reference: torch.Tensor) -> None:
        """``t`` has ``reference``'s device and dtype."""
        self.on(name, t, reference.device)
        if t.dtype != reference.dtype:
            raise self.type_error(f"{name} has dtype {t.dtype} but expected {reference.dtype}")

    def matrix(self, name: str, t: torch.Tensor) -> None:
        """``t`` is 2-D."""
        if t.dim() != 2:
            raise self.value_error(f"{name} must be 2-D, got shape {list(t.shape)}")

    def index(self, name: str, index: torch.Tensor, size: int, device: torch.device) -> None:
        """``index`` is a 1-D int64 tensor on ``device`` with values in [0, size). The values
        are read only where they are on the host (CPU): no device synchronisation."""
        self.on(name, index, device)
        if index.dtype != torch.int64:
            raise self.type_error(f"{name} must have dtype torch.int64, got {index.dtype}")
        if index.dim() != 1:
            raise self.value_error(f"{name} must be 1-D, got {index.dim()}-D")
        if index.device.type == "cpu":
            bad = ((index < 0) | (index >= size)).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise IndexError(f"{self.op}: {name}[{i}] = {int(index[i])} is out of range "
                                 f"[0, {size})")
