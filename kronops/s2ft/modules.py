"""S²FT layers over a frozen linear layer (nn.Linear or transformers Conv1D, see
``wrapped_linear``): ``S2FTLinear`` (adapter Δ) and ``S2FTInPlaceLinear``."""
import copy

import torch
from torch import nn

from ..checks import check_features
from ..wrapped_linear import WrapsLinear, check_linear
from . import optimizer_guard
from .ops import aligned_as, check_index, check_sorted_unique, sparse_linear


class S2FTLinear(WrapsLinear, nn.Module):
    """Train only rows R (output features) or columns C (input features) of a frozen Linear.

    x: (..., in_features) -> (..., out_features).  y = x W'ᵀ + b, W' = W with Δ added into
    the selection: rows mode Δ is (|R|, in), cols mode (out, |C|); Δ starts at zero, so a
    fresh adapter changes nothing. ``rows``/``cols`` (exactly one): a sorted, unique int64
    tensor, or a slice/range for a contiguous block (kept as a range: no index loads).
    Δ is kept in ``delta_dtype`` (contiguous, as FSDP requires) and cast in forward to the
    base weight's dtype with rows padded to a multiple of 16 elements (``aligned_as``). The state
    dict carries the selection (``index``, or a range's start in the extra state): loading
    takes it over, and a state of the other mode or kind (range vs tensor) raises.
    ``merge()`` adds Δ into base.weight (forward then runs the base alone); ``unmerge()``
    takes it out again (exact when Δ is representable in the weight's dtype). The base
    never gets a gradient; only ``delta`` is trainable. A Conv1D base (weight stored
    (in, out)) works the same: rows and columns are those of its (out, in) view.
    """

    def __init__(self, base: nn.Module, *, rows=None, cols=None,
                 delta_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_linear("base", base)
        if (rows is None) == (cols is None):
            raise ValueError("exactly one of rows and cols must be given")
        if not isinstance(delta_dtype, torch.dtype) or not delta_dtype.is_floating_point:
            raise TypeError(f"delta_dtype must be a floating-point torch.dtype, "
                            f"got {delta_dtype!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.mode = "cols" if cols is not None else "rows"
        size = self.in_features if cols is not None else self.out_features
        index, self.start, count = check_index(self.mode, cols if cols is not None else rows,
                                               size, base.weight.device)
        self.register_buffer("index", index.clone() if index is not None else None)
        shape = (self.out_features, count) if cols is not None else (count, self.in_features)
        self.delta = nn.Parameter(torch.zeros(shape, device=base.weight.device, dtype=delta_dtype))
        self.merged = False

    def selection(self):
        """The selection as ``sparse_linear`` takes it: the index tensor or a range."""
        if self.index is not None:
            return self.index
        count = self.delta.shape[1] if self.mode == "cols" else self.delta.shape[0]
        return range(self.start, self.start + count)

    def indices(self) -> torch.Tensor:
        """The selected rows or columns as an int64 tensor (also for a contiguous range)."""
        sel = self.selection()
        return sel if isinstance(sel, torch.Tensor) else \
            torch.arange(sel.start, sel.stop, device=self.delta.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """A saved ``index`` must be a selection this layer can use (int64, as many entries,
        sorted, unique, in range): otherwise the layer loads nothing and the load fails."""
        key = prefix + "index"
        saved = state_dict.get(key)
        if self.index is not None and saved is not None:
            size = self.in_features if self.mode == "cols" else self.out_features
            try:
                if saved.dtype != torch.int64 or saved.shape != self.index.shape:
                    raise ValueError(f"must be int64 of shape {tuple(self.index.shape)}, got "
                                     f"{saved.dtype} of shape {tuple(saved.shape)}")
                check_sorted_unique(key, saved, size)
            except ValueError as e:
                error_msgs.append(f"bad S²FT selection {key}: {e}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def get_extra_state(self) -> dict:
        """The selection beyond the ``index`` buffer: the mode, and a contiguous range's start
        (None when an index tensor selects)."""
        return {"mode": self.mode, "start": None if self.index is not None else self.start}

    def set_extra_state(self, state) -> None:
        """Take the saved selection (as the ``index`` buffer is taken): a saved range's start;
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
            start, count = int(state["start"]), len(self.selection())
            size = self.in_features if self.mode == "cols" else self.out_features
            if not 0 <= start <= size - count:
                raise ValueError(f"saved {self.mode} range start {start} does not fit {count} "
                                 f"{self.mode} of {size}")
            self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            check_features("x", x, self.in_features)
            return self.base(x)
        w = self.base_weight
        return sparse_linear(x, w, aligned_as(self.delta, w.dtype), bias=self.base.bias,
                             **{self.mode: self.selection()})

    def _weight_part(self) -> torch.Tensor:
        """The (view or index) of base.weight that Δ covers, for in-place updates."""
        w = self.base_weight
        sel = self.selection()
        if isinstance(sel, range):
            return w[:, sel.start:sel.stop] if self.mode == "cols" else w[sel.start:sel.stop]
        return None

    @torch.no_grad()
    def _add(self, sign: float) -> None:
        w = self.base_weight
        value = (sign * self.delta).to(w.dtype)
        part = self._weight_part()
        if part is not None:
            part += value
        else:
            w.index_add_(1 if self.mode == "cols" else 0, self.index, value)

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
    stored as one expanded scalar (no memory), so forward computes base(x) and backward
    gives ``selected.grad`` = the compact gradient of W[R] (or W[:, C]); no full-size
    weight.grad is made. ``kronops.s2ft.InPlaceAdamW``/``InPlaceSGD`` apply it to
    base.weight in place. Ordinary optimizers cannot update ``selected`` (it is expanded).
    """

    def __init__(self, base: nn.Module, *, rows=None, cols=None):
        super().__init__(base, rows=rows, cols=cols, delta_dtype=base.weight.dtype)
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
        return sparse_linear(x, self.base_weight, self.selected, bias=self.base.bias,
                             **{self.mode: self.selection()})

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
        """A copy of the trained submatrix of base.weight ((|R|, in) or (out, |C|))."""
        sel = self.indices()
        return self.base_weight.detach().index_select(1 if self.mode == "cols" else 0, sel)

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
