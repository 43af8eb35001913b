"""What an ``AdapterBank`` keeps for each adapted layer: its adapters, stacked so that one op
call serves every adapter of a group on a mixed batch, and their weight updates for merging.

Each adapter comes as an update of the layer in one of the forms of
``kronops.adapters.methods.updates`` (what its method's ``serve`` hook gives):
``KronUpdate``s (KronA/LoKr, KronA^B) form one ``KronGroup`` per factor shape (and per input:
KronA^B adapters on a sub-layer's output projection take the input of its first
projection), ``SparseUpdate``s (S²FT) one ``SparseGroup`` per mode (rows or cols); the
table ``GROUPS`` says which form goes to which group. Everything is kept in the layer's
weight dtype and device. Weight updates are given for the (out, in) view of the
weight (``out_in_weight``).
"""
import torch

from ..adapters.methods.updates import KronUpdate, SparseUpdate
from ..dtypes import accumulation_dtype
from ..kron.torch_kernels import kron
from ..s2ft.selection import Selection
from ..wrapped_linear import out_in_weight
from .ops import routed_kron_add, routed_sparse_add
from .routes import Route


class KronGroup:
    """KronA/LoKr adapters sharing one factor shape and input: a (P, a1, a2), b (P, b1, b2)
    with each adapter's scale folded into its b; ``names[p]`` is member p. ``source``: None
    (the input is the layer's own), or the module whose input the adapters take (KronA^B:
    the sub-layer's first projection; such a group also holds ``residual`` (P,), each
    member's s_res of KronA^B_res, 0 without)."""

    def __init__(self, source: str | None = None):
        self.names, self.a, self.b, self.source, self.residual = [], None, None, source, None

    @staticmethod
    def key(update: KronUpdate) -> tuple:
        """What the members of one group share: factor shapes and input."""
        return tuple(update.a.shape), tuple(update.b.shape), update.source

    @classmethod
    def of(cls, update: KronUpdate) -> "KronGroup":
        """An empty group for ``update``."""
        return cls(update.source)

    def add(self, name: str, update: KronUpdate) -> None:
        a, b = update.a, update.b
        self.names.append(name)
        self.a = a[None] if self.a is None else torch.cat([self.a, a[None]])
        self.b = b[None] if self.b is None else torch.cat([self.b, b[None]])
        if self.source is not None:
            r = a.new_zeros(1) if update.residual is None else update.residual.reshape(1).to(a)
            self.residual = r if self.residual is None else torch.cat([self.residual, r])

    def remove(self, name: str) -> None:
        p = self.names.index(name)
        del self.names[p]
        keep = [i for i in range(len(self.names) + 1) if i != p]
        self.a, self.b = self.a[keep], self.b[keep]
        if self.residual is not None:
            self.residual = self.residual[keep]

    def nbytes(self, name: str) -> int:
        p = self.names.index(name)
        return self.a[p].nbytes + self.b[p].nbytes + (
            0 if self.residual is None else self.residual.element_size())

    def update(self, name: str) -> torch.Tensor:
        """The adapter's (out, in) weight update kron(a, s b), in fp32 (fp64 for fp64); not
        for KronA^B groups (no weight update: ``AdapterBank.merge`` refuses them)."""
        p = self.names.index(name)
        wide = accumulation_dtype(self.a.dtype)
        return kron(self.a[p].to(wide), self.b[p].to(wide))

    def apply(self, y, x, route: Route, rows: int, per_row: int, slots: dict) -> None:
        groups = route.groups(rows, per_row, tuple(slots[n] for n in self.names), x.device)
        if not groups.offsets[-1]:
            return
        tiles = route.tiles(groups, tuple((p, 0) for p in range(len(self.names))), x.device)
        routed_kron_add(y, x, self.a.to(x.dtype), self.b.to(x.dtype), groups.tokens, tiles,
                        groups.offsets, groups.starts)
        if self.residual is not None:  # + s_res x for each token of a KronA^B_res member
            counts = torch.tensor([hi - lo for lo, hi in zip(groups.offsets,
                                                                groups.offsets[1:])])
            scale = self.residual.repeat_interleave(counts.to(x.device))
            y.index_add_(0, groups.tokens,
                         (x.index_select(0, groups.tokens) * scale[:, None].to(x)).to(y.dtype))


class SparseGroup:
    """S²FT adapters in one mode, each in a block of one width W: ``values`` (P·W, in) holds
    Δ_p's rows (rows mode) or Δ_pᵀ's rows (cols mode) and ``index`` (P·W,) the output rows or
    input columns they cover; block p's first widths[p] entries are real, the rest zero."""

    def __init__(self, mode: str):
        self.mode, self.names, self.widths = mode, [], []
        self.values, self.index = None, None
        self.selections: dict[str, Selection] = {}  # each member's, for merge

    def _blocks(self):
        """[(index, values)] per member, without padding."""
        width = self.values.shape[0] // len(self.names) if self.names else 0
        return [(self.index[p * width:p * width + w], self.values[p * width:p * width + w])
                for p, w in enumerate(self.widths)]

    def _pack(self, blocks) -> None:
        """Lay ``blocks`` [(index, values)] out padded to the widest."""
        if not blocks:
            self.values = self.index = None
            return
        width = max(len(i) for i, _ in blocks)
        index, values = blocks[0]
        self.index = index.new_zeros(len(blocks) * width)
        self.values = values.new_zeros((len(blocks) * width, values.shape[1]))
        for p, (index, values) in enumerate(blocks):
            self.index[p * width:p * width + len(index)] = index
            self.values[p * width:p * width + len(index)] = values

    @staticmethod
    def key(update: SparseUpdate) -> str:
        """What the members of one group share: the mode."""
        return update.selection.side

    @classmethod
    def of(cls, update: SparseUpdate) -> "SparseGroup":
        """An empty group for ``update``."""
        return cls(update.selection.side)

    def add(self, name: str, update: SparseUpdate) -> None:
        """Δ: rows mode (|R|, in), cols mode (out, |C|)."""
        delta = update.delta.T if self.mode == "cols" else update.delta
        blocks = self._blocks() if self.names else []
        self._pack(blocks + [(update.selection.indices(delta.device), delta)])
        self.names.append(name)
        self.widths.append(update.selection.count)
        self.selections[name] = update.selection

    def remove(self, name: str) -> None:
        p = self.names.index(name)
        blocks = self._blocks()
        del blocks[p], self.names[p], self.widths[p], self.selections[name]
        self._pack(blocks)

    def nbytes(self, name: str) -> int:
        width = self.widths[self.names.index(name)]
        row = self.values.shape[1] * self.values.element_size()
        return width * (self.index.element_size() + row)

    def selection(self, name: str) -> tuple[Selection, torch.Tensor]:
        """(selection, Δ) of one adapter, Δ as the weight part it updates."""
        _, values = self._blocks()[self.names.index(name)]
        return self.selections[name], values.T if self.mode == "cols" else values

    def apply(self, y, x, route: Route, rows: int, per_row: int, slots: dict) -> None:
        groups = route.groups(rows, per_row, tuple(slots[n] for n in self.names), x.device)
        if groups.offsets[-1]:
            width = self.values.shape[0] // len(self.names)
            columns = tuple((p * width, p * width + w) for p, w in enumerate(self.widths))
            tiles = route.tiles(groups, columns, x.device)
            routed_sparse_add(y, x, self.values.to(x.dtype), self.index, groups.tokens, tiles,
                              groups.offsets, groups.starts, self.widths, self.mode == "cols")


GROUPS = {KronUpdate: KronGroup, SparseUpdate: SparseGroup}  # the group of each update form


class LayerAdapters:
    """The adapters of one linear layer (nn.Linear or Conv1D), by group."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self.groups = {}  # (group class, its key of the members' updates) -> group

    def add(self, name: str, update: KronUpdate | SparseUpdate) -> None:
        """Adapter ``name``'s update of this layer, into the group of its kind and key."""
        group = GROUPS[type(update)]
        self.groups.setdefault((group, group.key(update)), group.of(update)).add(name, update)

    def holding(self, name: str) -> list:
        return [g for g in self.groups.values() if name in g.names]

    def remove(self, name: str) -> None:
        for key, group in list(self.groups.items()):
            if name in group.names:
                group.remove(name)
                if not group.names:
                    del self.groups[key]

    def nbytes(self, name: str) -> int:
        return sum(g.nbytes(name) for g in self.holding(name))

    def sources(self) -> set[str]:
        """The modules whose inputs this layer's KronA^B adapters take."""
        return {g.source for g in self.groups.values()
                if isinstance(g, KronGroup) and g.source is not None}

    def apply(self, y, x, route: Route, slots: dict, inputs: dict) -> None:
        """y (rows, ..., out) += every routed adapter's part for x (rows, ..., in), in place;
        ``inputs``: this forward pass's inputs of the KronA^B source modules, by name."""
        stored = next(iter(self.groups.values()))
        held = stored.a if isinstance(stored, KronGroup) else stored.values
        if held.device != x.device or held.dtype != out_in_weight(self.layer).dtype:
            raise RuntimeError(f"the bank holds this layer's adapters as {held.dtype} on "
                               f"{held.device}, the layer is now {out_in_weight(self.layer).dtype}"
                               f" on {x.device}: the model was moved after loading; create "
                               "the bank (or load the files) after moving the model")
        rows = y.shape[0] if y.dim() > 1 else 1
        route.check_rows(rows, folded=y.dim() == 2)
        per_row = y.numel() // max(rows * y.shape[-1], 1)
        y2 = y.view(-1, y.shape[-1])
        taken = {name: inputs.pop(name, None) for name in self.sources()}  # used once
        for group in self.groups.values():
            source = getattr(group, "source", None)
            given = x if source is None else taken[source]
            if given is None:
                raise RuntimeError(f"the KronA^B source {group.source!r} did not run before "
                                   "its sub-layer's output projection in this forward pass")
            if given.shape[:-1] != y.shape[:-1]:
                raise ValueError(f"sub-layer input of shape {tuple(given.shape)} does not "
                                 f"match its output of shape {tuple(y.shape)}")
            group.apply(y2, given.reshape(-1, given.shape[-1]), route, rows, per_row, slots)

    @torch.no_grad()
    def merge(self, name: str) -> list:
        """Add the adapter into the weight in place; what ``unmerge`` needs to undo it."""
        w = out_in_weight(self.layer)
        undo = []
        for group in self.holding(name):
            if isinstance(group, KronGroup):  # W + update in fp32 (fp64), rounded once
                update = group.update(name)
                w.copy_(w.to(update.dtype) + update)
                undo.append((group, name))
            else:
                selection, delta = group.selection(name)
                undo.append((selection, selection.part(w)))
                selection.add_into(w, delta)
        return undo

    @torch.no_grad()
    def unmerge(self, undo: list) -> None:
        """Take a merge out again: S²FT parts restored from the saved values (exact), KronA
        updates subtracted in fp32 (see ``AdapterBank.unmerge`` for the bound)."""
        w = out_in_weight(self.layer)
        for step in reversed(undo):
            if isinstance(step[0], KronGroup):
                group, name = step
                update = group.update(name)
                w.copy_(w.to(update.dtype) - update)
            else:
                selection, saved = step
                selection.copy_into(w, saved)
