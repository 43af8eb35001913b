"""Parameters sharded by FSDP2 (DTensors) gathered whole, for saving."""
import torch


def whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded FSDP2 parameter (DTensor) gathered whole (a collective: every rank calls
    it), else ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
