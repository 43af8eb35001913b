"""Argument checks shared by the public ops: clear TypeError/ValueError naming the argument."""
import torch


def check_tensor(name: str, t, *, dim: int | None = None) -> torch.Tensor:
    """``t`` must be a floating-point tensor (of ``dim`` dimensions when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
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


def check_scale(scale) -> float:
    """``scale`` is a real Python number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float, got {type(scale).__name__}")
    return float(scale)
