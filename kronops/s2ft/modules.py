"""S²FT layers over a frozen linear layer (nn.Linear or transformers Conv1D, see
``wrapped_linear``): ``S2FTLinear`` (adapter Δ) and ``S2FTInPlaceLinear``."""
import copy

import torch
from torch import nn

from ..checks import check_features
from ..wrapped_linear import WrapsLinear, check_linear
from . import optimizer_guard
from .ops import aligned_as, checked_sparse_linear, sparse_linear
from .selection import Selection


class S2FTLinear(WrapsLinear, nn.Module):
    """Train only rows R (output features) or columns C (input features) of a frozen Linear.

    x: (..., in_features) -> (..., out_features).  y = x W'ᵀ + b, W' = W with Δ added into
    the selection: rows mode Δ is (|R|, in), cols mode (out, |C|); Δ starts at zero, so a
    fresh adapter changes nothing. The selection, exactly one of: ``selection`` (a
    ``Selection`` for the base's weight), or ``rows``/``cols``: a sorted, unique int64 tensor
    (copied), or a slice/range for a contiguous block (kept as a range: no index loads).
    It is checked once, here, and held as ``chosen`` (a ``Selection``; ``index``, ``start``
    and ``mode`` read it). Δ is kept in ``delta_dtype`` (contiguous, as FSDP requires) and
    cast in forward to the base weight's dtype with rows padded to a multiple of 16 elements
    (``aligned_as``). The state dict carries the selection (``index``, or a range's start in
    the extra state): loading checks and takes it over, and a state of the other mode or kind
    (range vs tensor) raises. ``merge()`` adds Δ into base.weight (forward then runs the base
    alone); ``unmerge()`` takes it out again (exact when Δ is representable in the weight's
    dtype). The base never gets a gradient; only ``delta`` is trainable. A Conv1D base
    (weight stored (in, out)) works the same: rows and columns are those of its (out, in)
    view.
    """

    def __init__(self, base: nn.Module, selection: Selection | None = None, *, rows=None,
                 cols=None, delta_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_linear("base", base)
        if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
            raise TypeError(f"delta_dtype must be a floating-point torch.dtype, "
                            f"got {delta_dtype!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = self.base_weight
        rows, cols = (s.clone() if isinstance(s, torch.Tensor) else s for s in (rows, cols))
        self.chosen = Selection.given(selection, rows, cols, weight_shape=w.shape,
                                      device=w.device)
        self.delta = nn.Parameter(torch.zeros(self.chosen.part_shape(w.shape), device=w.device,
                                              dtype=delta_dtype))
        self.merged = False

    @property
    def mode(self) -> str:
        """"rows" or "cols": the side of the weight the selection is on."""
        return self.chosen.side

    @property
    def index(self) -> torch.Tensor | None:
        """The selected positions (count,), or None for a contiguous range."""
        return self.chosen.index

    @property
    def start(self) -> int:
        """A contiguous range's first position (0 for an index tensor)."""
        return self.chosen.start

    def selection(self):
        """The selection as ``sparse_linear`` takes it for ``rows``/``cols``: the index
        tensor or a range."""
        return self.chosen.range if self.chosen.is_range else self.chosen.index

    def indices(self) -> torch.Tensor:
        """The selected rows or columns as an int64 tensor (also for a contiguous range)."""
        return self.chosen.indices(self.delta.device)

    def _apply(self, fn, recurse=True):
        """Move the selection with the weight (``to``, ``cuda``, ...)."""
        super()._apply(fn, recurse)
        self.chosen = self.chosen.to(self.base_weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.chosen.index is not None:
            destination[prefix + "index"] = self.chosen.index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A saved ``index`` must be a selection this layer can use (int64, as many entries,
        sorted, unique, in range): otherwise the layer loads nothing and the load fails."""
        key = prefix + "index"
        saved, loaded = state_dict.get(key), None
        if self.chosen.index is not None and saved is not None:
            try:
                if saved.dtype != torch.int64 or saved.shape != self.chosen.index.shape:
                    raise ValueError(f"must be int64 of shape {tuple(self.chosen.index.shape)}, "
                                     f"got {saved.dtype} of shape {tuple(saved.shape)}")
                loaded = Selection(self.mode, saved.to(self.chosen.device, copy=True),
                                   size=self.chosen.size, name=key)
            except (TypeError, ValueError) as e:
                error_msgs.append(f"bad S²FT selection {key}: {e}")
                return
        elif self.chosen.index is not None and strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if loaded is not None:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            self.chosen = loaded

    def get_extra_state(self) -> dict:
        """The selection beyond the ``index`` tensor: the mode, and a contiguous range's start
        (None when an index tensor selects)."""
        return {"mode": self.mode, "start": None if self.index is not None else self.start}

    def set_extra_state(self, state) -> None:
        """Take the saved selection (as the ``index`` tensor is taken): a saved range's start;
        a different mode, or a range where this layer has an index tensor (or the reverse),
        raises ValueError."""
        def describe(mode, contiguous):
            return f"{mode} ({'a contiguous range' if contiguous else 'an index tensor'})"

        ours = describe(self.mode, self.index is None)
        if not isinstance(state, dict) or state.get("mode") not in ("rows", "cols"):
            raise ValueError(f"S2FTLinear state has no valid selection: got {state!r}")
        theirs = describe(state["mode"], state.get("start") is not None)
        if theirs != ours:
            raise ValueError(f"cannot load the state of an S2FTLinear selecting {theirs} into "
                             f"one selecting {ours}")
        if self.index is None:
            start, count, size = int(state["start"]), self.chosen.count, self.chosen.size
            if not 0 <= start <= size - count:
                raise ValueError(f"saved {self.mode} range start {start} does not fit {count} "
                                 f"{self.mode} of {size}")
            self.chosen = Selection(self.mode, range(start, start + count), size=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            check_features("x", x, self.in_features)
            return self.base(x)
        w = self.base_weight
        return sparse_linear(x, w, aligned_as(self.delta, w.dtype), self.chosen,
                             bias=self.base.bias)

    @torch.no_grad()
    def _add(self, sign: float) -> None:
        self.chosen.add_into(self.base_weight, sign * self.delta)

    def merge(self) -> None:
        """Add Δ into the selected rows/columns of base.weight."""
        if self.merged:
            raise RuntimeError("S2FTLinear is already merged; unmerge() first")
        self._add(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the merged Δ from base.weight again."""
        if not self.merged:
            raise RuntimeError("S2FTLinear is not merged")
        self._add(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.mode}={self.delta.shape[1 if self.mode == 'cols' else 0]}, "
                f"contiguous={self.index is None}, merged={self.merged}")


class S2FTInPlaceLinear(S2FTLinear):
    """Train rows R or columns C of a Linear's own weight, updated in place (no adapter Δ).

    ``selected`` stands in for the trained submatrix ((|R|, in) or (out, |C|)): always zero,
    stored as one expanded scalar (no memory), so forward computes base(x), one GEMM on W,
    and backward adds to the frozen layer's dX only ``selected.grad`` = the compact gradient
    of W[R] (or W[:, C]); no full-size weight.grad is made. ``kronops.s2ft.InPlaceAdamW`` and
    ``InPlaceSGD`` apply it to base.weight in place. Ordinary optimizers cannot update ``selected`` (it is expanded).
    """

    def __init__(self, base: nn.Module, selection: Selection | None = None, *, rows=None,
                 cols=None):
        super().__init__(base, selection, rows=rows, cols=cols, delta_dtype=base.weight.dtype)
        shape = self.delta.shape
        del self.delta
        self.selected = _expanded_zero(shape, base.weight, requires_grad=True)
        optimizer_guard.guard()

    def __deepcopy__(self, memo):
        """A copy whose ``selected`` is again an expanded zero (a Parameter's deepcopy clones
        it into a full, writable tensor, which a torch optimizer would then train unseen)."""
        selected = self.selected
        memo[id(selected)] = _expanded_zero(selected.shape, selected, selected.requires_grad)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def delta(self) -> torch.Tensor:
        return self.selected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checked_sparse_linear(x, self.base_weight, self.selected, self.chosen,
                                     bias=self.base.bias, zero_delta=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """``selected`` is an expanded zero (nothing to copy into): only its shape is checked."""
        key = prefix + "selected"
        selected = self._parameters.pop("selected")
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
        finally:
            self._parameters["selected"] = selected
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
        elif tuple(state_dict[key].shape) != tuple(selected.shape):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                              f"{tuple(state_dict[key].shape)} from checkpoint, the shape in "
                              f"current model is {tuple(selected.shape)}.")

    def weight_part(self) -> torch.Tensor:
        """A copy of the trained submatrix of base.weight ((|R|, in) or (out, |C|)): what
        the in-place optimizers' master values start from."""
        return self.chosen.part(self.base_weight.detach())

    @torch.no_grad()
    def write_weight_part(self, values: torch.Tensor) -> None:
        """Write ``values`` ((|R|, in) or (out, |C|), any floating dtype: rounded to the
        weight's) into the trained submatrix of base.weight, in place."""
        self.chosen.copy_into(self.base_weight, values)

    def merge(self) -> None:
        raise RuntimeError("S2FTInPlaceLinear trains the weight in place: nothing to merge")

    unmerge = merge

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.mode}={self.selected.shape[1 if self.mode == 'cols' else 0]}, "
                f"contiguous={self.index is None}, inplace=True")


def _expanded_zero(shape, like: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    """A zero Parameter of ``shape`` stored as one expanded scalar (``like``'s device, dtype)."""
    zero = torch.zeros((), device=like.device, dtype=like.dtype)
    return nn.Parameter(zero.expand(shape), requires_grad=requires_grad)
