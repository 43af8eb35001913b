"""Operands inside padded buffers, for the kernel tests that check nothing is read or written
outside them."""
import torch

NAN = float("nan")
SENTINEL = 12345.0  # padding of tensors a kernel writes: any value written over it differs


class Guarded:
    """A (m, n) operand inside a (m + 2, n + 4) buffer padded with ``guard`` (its rows are
    not contiguous)."""

    def __init__(self, m: int, n: int, guard: float = NAN, dtype=torch.float32):
        self.guard = guard
        self.buffer = torch.full((m + 2, n + 4), guard, dtype=dtype)
        self.view = self.buffer[1:m + 1, 2:n + 2]
        self.view.copy_(torch.randn(m, n))
        self.inside = torch.zeros_like(self.buffer, dtype=torch.bool)
        self.inside[1:m + 1, 2:n + 2] = True

    def guard_intact(self) -> bool:
        padding = self.buffer[~self.inside]
        return bool(padding.isnan().all() if self.guard != self.guard else
                    (padding == self.guard).all())
