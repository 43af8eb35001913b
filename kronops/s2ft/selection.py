"""``Selection``: which rows or columns of an (out, in) weight S²FT trains, as one checked value.

A selection is one side of the weight ("rows": output features, Δ (count, in); "cols": input
features, Δ (out, count)) of ``size`` positions (out or in), and either an int64 index
(count,), sorted, unique and in [0, size), or the contiguous range [start, start + count).
It is checked once, when made (an index's values are read on the host there, so a CUDA
index synchronises once), and is immutable afterwards: layers, ``sparse_linear`` and the
in-place optimizers pass it on without reading its values again. ``op_args`` is what
``torch.ops.kronops.sparse_*`` take for it: (index or None, start, cols).
"""
import torch

SIDES = ("rows", "cols")


def check_sorted_unique(name: str, index: torch.Tensor, size: int) -> None:
    """``index`` (1-D int64, possibly empty) is strictly increasing and lies in [0, size).

    Reads the values on the host (not for torch.compile tracing).
    """
    if index.numel() == 0:
        return
    repeats = index[1:] <= index[:-1]
    if bool(repeats.any()):
        j = int(repeats.nonzero()[0]) + 1
        raise ValueError(f"{name} must be sorted and unique (strictly increasing), got "
                         f"{name}[{j - 1}] = {int(index[j - 1])} and {name}[{j}] = {int(index[j])}")
    first, last = index[0].item(), index[-1].item()
    if first < 0 or last >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values from {first} to {last}")


class Selection:
    """Rows or columns of an (out, in) weight: see the module docstring.

    Made by ``Selection.rows(selected, size=out)``, ``Selection.cols(selected, size=in)`` or
    ``Selection(side, selected, size=...)``; ``selected`` is a 1-D int64 tensor (kept, made
    contiguous: not to be changed afterwards) or a slice/range with step 1. ``name`` is what
    errors call it (the side by default). Equal selections have the same side and size, and
    the same range or the same index values (a range never equals an index tensor).
    """
    __slots__ = ("side", "size", "index", "start", "count")

    def __init__(self, side: str, selected, *, size: int, name: str | None = None):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        name = side if name is None else name
        if isinstance(selected, (slice, range)):
            index, start, count = None, *_range(name, selected, size)
        else:
            index, start, count = _index(name, selected, size), 0, selected.numel()
        self._set(side, size, index, start, count)

    def _set(self, side, size, index, start, count) -> None:
        for slot, value in zip(self.__slots__, (side, size, index, start, count)):
            object.__setattr__(self, slot, value)

    @classmethod
    def rows(cls, selected, *, size: int, name: str = "rows") -> "Selection":
        """Output rows of a weight with ``size`` (out) rows."""
        return cls("rows", selected, size=size, name=name)

    @classmethod
    def cols(cls, selected, *, size: int, name: str = "cols") -> "Selection":
        """Input columns of a weight with ``size`` (in) columns."""
        return cls("cols", selected, size=size, name=name)

    @classmethod
    def given(cls, selection, rows, cols, *, weight_shape, device) -> "Selection":
        """The one selection of ``selection`` (a Selection) or ``rows``/``cols`` (a Selection
        of that side, an index tensor, a slice or a range) for a weight of ``weight_shape``
        (out, in) on ``device``; exactly one must be given."""
        if sum(s is not None for s in (selection, rows, cols)) != 1:
            raise ValueError("exactly one of rows and cols (or a selection) must be given")
        if selection is not None and not isinstance(selection, Selection):
            raise TypeError(f"selection must be a kronops.s2ft.Selection, "
                            f"got {type(selection).__name__}")
        side = "rows" if rows is not None else "cols" if cols is not None else selection.side
        value = {"rows": rows, "cols": cols}[side] if selection is None else selection
        name = side if selection is None else "selection"
        size = weight_shape[SIDES.index(side)]
        if not isinstance(value, Selection):
            value = cls(side, value, size=size, name=name)
        elif value.side != side or value.size != size:
            raise ValueError(f"{name} selects {value.side} of {value.size}, expected {side} of "
                             f"{size} for a weight of shape {tuple(weight_shape)}")
        if value.index is not None and value.index.device != device:
            raise ValueError(f"{name} is on {value.index.device} but weight is on {device}")
        return value

    @property
    def dim(self) -> int:
        """The weight dimension selected along: 0 rows, 1 cols."""
        return SIDES.index(self.side)

    @property
    def is_range(self) -> bool:
        return self.index is None

    @property
    def range(self) -> range | None:
        """The contiguous range, or None for an index tensor."""
        return range(self.start, self.start + self.count) if self.index is None else None

    @property
    def device(self) -> torch.device | None:
        """The index tensor's device (None for a range: it holds no tensor)."""
        return None if self.index is None else self.index.device

    @property
    def op_args(self) -> tuple[torch.Tensor | None, int, bool]:
        """(index or None, start, cols): the selection arguments of torch.ops.kronops.sparse_*."""
        return self.index, self.start, self.side == "cols"

    def part_shape(self, weight_shape) -> tuple[int, int]:
        """The selected part of an (out, in) weight: (count, in) rows, (out, count) cols (Δ's
        shape, and that of its gradient and optimizer state)."""
        out, in_ = weight_shape
        return (out, self.count) if self.side == "cols" else (self.count, in_)

    def to(self, device) -> "Selection":
        """This selection with its index on ``device`` (itself when already there, or a range)."""
        if self.index is None or self.index.device == torch.device(device):
            return self
        moved = Selection.__new__(Selection)
        moved._set(self.side, self.size, self.index.to(device), self.start, self.count)
        return moved

    def as_range_if_contiguous(self) -> "Selection":
        """This selection as a range when its index is contiguous (no index loads), else
        itself; reads the index on the host."""
        if self.index is None:
            return self
        first = self.index[0].item()
        if self.index[-1].item() - first + 1 != self.count:  # sorted and unique: contiguous
            return self
        return Selection(self.side, range(first, first + self.count), size=self.size)

    def indices(self, device=None) -> torch.Tensor:
        """The positions as an int64 tensor (count,) (a range's made on ``device``)."""
        if self.index is not None:
            return self.index
        return torch.arange(self.start, self.start + self.count, device=device)

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the selected part of ``t`` along ``dim`` (of a weight: ``part_shape``)."""
        if self.index is None:
            return t.narrow(self.dim, self.start, self.count).clone()
        return t.index_select(self.dim, self.index)

    def add_into(self, t: torch.Tensor, values: torch.Tensor) -> None:
        """``t``'s selected part += values (in ``t``'s dtype), in place."""
        if self.index is None:
            t.narrow(self.dim, self.start, self.count).add_(values.to(t.dtype))
        else:
            t.index_add_(self.dim, self.index, values.to(t.dtype))

    def copy_into(self, t: torch.Tensor, values: torch.Tensor) -> None:
        """``t``'s selected part = values (rounded to ``t``'s dtype), in place."""
        if self.index is None:
            t.narrow(self.dim, self.start, self.count).copy_(values)
        else:
            t.index_copy_(self.dim, self.index, values.to(t.dtype))

    def __setattr__(self, name, value):
        raise AttributeError(f"Selection is immutable: cannot set {name}")

    def __delattr__(self, name):
        raise AttributeError(f"Selection is immutable: cannot delete {name}")

    def __reduce__(self):
        """Pickled (and deep-copied) by value, checked again when loaded."""
        return _restore, (self.side, self.range if self.index is None else self.index, self.size)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        if (self.side, self.size, self.start, self.count, self.index is None) != \
                (other.side, other.size, other.start, other.count, other.index is None):
            return False
        return self.index is None or torch.equal(self.index.cpu(), other.index.cpu())

    def __hash__(self) -> int:
        return hash((self.side, self.size, self.start, self.count, self.index is None))

    def __repr__(self) -> str:
        what = f"range({self.start}, {self.start + self.count})" if self.index is None else \
            f"index of {self.count} on {self.index.device}"
        return f"Selection.{self.side}({what}, size={self.size})"


def _restore(side: str, selected, size: int) -> Selection:
    return Selection(side, selected, size=size)


def _range(name: str, selected: slice | range, size: int) -> tuple[int, int]:
    """(start, count) of a slice or range with step 1 inside [0, size]."""
    step = 1 if selected.step is None else selected.step
    start = 0 if selected.start is None else selected.start
    stop = size if selected.stop is None else selected.stop
    if step != 1:
        raise ValueError(f"{name} must have step 1, got {selected}")
    if not 0 <= start < stop <= size:
        raise ValueError(f"{name} must satisfy 0 <= start < stop <= {size}, got {selected}")
    return start, stop - start


def _index(name: str, selected, size: int) -> torch.Tensor:
    """A valid index tensor, contiguous (values checked on the host, except while
    torch.compile traces and on meta tensors, which have none)."""
    if not isinstance(selected, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor, a slice or a range, "
                        f"got {type(selected).__name__}")
    if selected.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {selected.dtype}")
    if selected.dim() != 1 or selected.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape "
                         f"{tuple(selected.shape)}")
    if not torch.compiler.is_compiling() and selected.device.type != "meta":
        check_sorted_unique(name, selected, size)
    return selected.contiguous()
