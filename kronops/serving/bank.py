"""``AdapterBank``: many fine-tuned adapters served on one base model, in mixed batches.

Any KronA/LoKr, KronA^B or S²FT file written by ``save_adapters`` loads into a bank over the
plain base model it was trained on; inside ``bank.route(names)`` each batch row runs through its
own adapter (or the base model) while every layer computes its base GEMM once for the
whole batch. ``merge``/``unmerge`` fuse one adapter into the base weights and take it out.
"""
import contextlib

import torch
from torch import nn

from ..adapters.errors import AdapterFileError
from ..adapters.files import check_load
from ..adapters.methods import adapter_modules
from ..adapters.state import adapter_state
from .layers import LayerAdapters
from .routes import Route


class AdapterBank:
    """Adapters loaded side by side over one plain base ``model`` (changed only while an
    adapter is merged), served per batch row.

    ``load(name, path)``, ``unload(name)``, ``names``; ``with bank.route(names):`` runs
    each batch row through adapter ``names[i]`` (None: the base model); ``merge(name)`` /
    ``unmerge()``, ``merged``; ``nbytes(name)``: the memory one adapter takes.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if adapter_state(model) is not None or adapter_modules(model):
            raise ValueError("AdapterBank serves a plain base model, and this one has kronops "
                             "adapters: merge_adapters(model, unload=True) first, or give the "
                             "bank the base model")
        self.model = model
        self._names = []
        self._layers = {}      # module name -> LayerAdapters
        self._route = None
        self._merged = None    # (name, {module name: undo})

    @property
    def names(self) -> list[str]:
        """The loaded adapters, in load order (a route's tensor form indexes this list)."""
        return list(self._names)

    @property
    def merged(self) -> str | None:
        """The adapter merged into the base weights, or None."""
        return self._merged[0] if self._merged else None

    def _check_loaded(self, name) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name not in self._names:
            raise KeyError(f"no adapter {name!r} in the bank (loaded: {self._names})")

    def _check_idle(self, action: str) -> None:
        if self._route is not None:
            raise RuntimeError(f"cannot {action} inside bank.route(...)")

    def load(self, name: str, path) -> None:
        """Load the adapter file at ``path`` (``save_adapters``' format) as ``name``.

        KronA/LoKr, KronA^B and S²FT files (either mode) trained on this base model load
        (in any dtype); a file for another model (module names, sizes, plan, or a base
        fingerprint that differs: another checkpoint of the same architecture) raises
        ``AdapterFileError`` and leaves the bank and the model as they were, as do files
        that also train whole modules (a bank keeps one copy of every other module). Files
        without a fingerprint (format version 2) load unchecked.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._names:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        self._check_idle("load")
        if self._merged:
            raise RuntimeError(f"cannot load while {self.merged!r} is merged (in-place S²FT "
                               "files are read against the base weights): unmerge() first")
        checked = check_load(self.model, path, strict=True)
        if checked.train_modules:
            raise AdapterFileError(f"also trains whole modules {checked.train_modules}, which "
                                   "a bank cannot hold per adapter (it shares one copy of "
                                   "each): load_adapters() it into a copy of the model",
                                   whole_file=True).about(path)
        for module, update in checked.spec.serve(self.model, checked.tensors).items():
            self._layer(module).add(name, update)
        self._names.append(name)

    def _layer(self, module: str) -> LayerAdapters:
        if module not in self._layers:
            self._layers[module] = LayerAdapters(self.model.get_submodule(module))
        return self._layers[module]

    def unload(self, name: str) -> None:
        """Drop adapter ``name`` (not while it is merged or a route runs)."""
        self._check_loaded(name)
        self._check_idle("unload")
        if self.merged == name:
            raise RuntimeError(f"{name!r} is merged into the base weights: unmerge() first")
        for module, layer in list(self._layers.items()):
            layer.remove(name)
            if not layer.groups:
                del self._layers[module]
        self._names.remove(name)

    def nbytes(self, name: str) -> int:
        """Bytes the bank holds for adapter ``name`` (factors, or Δ and its indices)."""
        self._check_loaded(name)
        return sum(layer.nbytes(name) for layer in self._layers.values())

    def _slots(self, names) -> torch.Tensor:
        """A route's bank slots (host int64), checked: names or None, or a 1-D integer tensor
        of slots in [-1, len(names))."""
        if isinstance(names, torch.Tensor):
            if names.dim() != 1 or names.numel() == 0 or names.dtype != torch.int64:
                raise ValueError(f"a route tensor must be a non-empty 1-D int64 tensor of bank "
                                 f"slots, got {names.dtype} of shape {tuple(names.shape)}")
            slots = names.cpu()
            bad = slots[(slots < -1) | (slots >= len(self._names))]
            if bad.numel():
                raise ValueError(f"route slots must lie in [-1, {len(self._names)}) (-1: base "
                                 f"model), got {bad.tolist()[:4]}")
            return slots
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise TypeError("names must be a non-empty list of adapter names (None: base "
                            f"model), one per batch row, or an int64 tensor; got {names!r}")
        unknown = sorted({repr(n) for n in names if n is not None and n not in self._names})
        if unknown:
            raise ValueError(f"route names {', '.join(unknown)} are not loaded (loaded: "
                             f"{self._names})")
        return torch.tensor([-1 if n is None else self._names.index(n) for n in names])

    @contextlib.contextmanager
    def route(self, names, *, rows_per_name: int = 1):
        """Inside, batch row i of every forward pass runs through adapter ``names[i]``
        (None, or -1 in a tensor of slots: the base model); holds across ``generate()``
        steps. ``rows_per_name=k``: each name covers k consecutive rows instead (beam search
        with k beams, ``num_return_sequences=k``: row r runs through ``names[r // k]``); a
        batch of one row per name is still routed one row per name (an encoder-decoder's
        encoder runs before the beams are made). A batch of any other size raises a
        ValueError naming both lengths: a list is never read as beams unless asked.
        Each adapted layer computes its base output for the whole batch, then adds
        each row's adapter (``routed_kron_add``/``routed_sparse_add``: one launch per
        layer and adapter group on CUDA). For inference: a forward pass that needs
        gradients raises."""
        slots = self._slots(names)
        if isinstance(rows_per_name, bool) or not isinstance(rows_per_name, int):
            raise TypeError(f"rows_per_name must be a positive int, got {rows_per_name!r}")
        if rows_per_name <= 0:
            raise ValueError(f"rows_per_name must be a positive int, got {rows_per_name!r}")
        self._check_idle("start a route")
        replaced = [m for m, layer in self._layers.items()
                    if self.model.get_submodule(m) is not layer.layer]
        if replaced or adapter_state(self.model) is not None:
            raise RuntimeError(f"the model's layers changed since the adapters were loaded "
                               f"(e.g. {(replaced or ['adapters applied'])[0]}): a bank serves "
                               "the plain base model it was given")
        if self._merged:
            raise RuntimeError(f"{self.merged!r} is merged into the base weights: unmerge() "
                               "before routing mixed batches")
        route = Route(slots, rows_per_name)
        slot_of = {n: i for i, n in enumerate(self._names)}
        inputs = {}  # this forward pass's inputs of the KronA^B source modules
        handles = [self.model.register_forward_pre_hook(_batch_check(route), with_kwargs=True)]
        handles += [layer.layer.register_forward_hook(_routed_hook(layer, route, slot_of, inputs))
                    for layer in self._layers.values()]
        for source in set().union(*(layer.sources() for layer in self._layers.values())):
            handles.append(self.model.get_submodule(source).register_forward_pre_hook(
                _input_tap(source, inputs)))
        self._route = route
        try:
            yield self
        finally:
            self._route = None
            for handle in handles:
                handle.remove()

    def merge(self, name: str) -> None:
        """Fuse adapter ``name`` into the base weights in place (S²FT: only its selected
        rows/columns change); an adapter merged before is taken out first. The model then
        runs as that adapter's fine-tuned model at the base model's cost."""
        self._check_loaded(name)
        self._check_idle("merge")
        for layer in self._layers.values():
            if any(getattr(g, "source", None) for g in layer.holding(name)):
                raise RuntimeError(f"{name!r} holds KronA^B adapters: they run in parallel "
                                   "with non-linear sub-layers, so they are not weight changes "
                                   "and cannot be merged (route them instead)")
        if self.merged == name:
            return
        if self._merged:
            self.unmerge()
        self._merged = (name, {module: layer.merge(name)
                               for module, layer in self._layers.items()
                               if layer.holding(name)})

    def unmerge(self) -> None:
        """Restore the base weights. S²FT rows/columns are restored exactly (their values are
        kept while merged); a KronA update is subtracted in fp32 and rounded once, so each
        weight element w comes back within u (|w| + |w'|) of itself (u: the weight dtype's
        unit roundoff, w' its merged value): exactly in most elements, never drifting by more
        than that per merge."""
        self._check_idle("unmerge")
        if not self._merged:
            raise RuntimeError("no adapter is merged")
        for module, undo in self._merged[1].items():
            self._layers[module].unmerge(undo)
        self._merged = None

    def __repr__(self) -> str:
        return (f"AdapterBank({type(self.model).__name__}, adapters={self._names}, "
                f"layers={len(self._layers)}, merged={self.merged!r})")


BATCH_INPUTS = ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds")


def _batch_check(route: Route):
    """A forward pre-hook on the model checking its batch (its first tensor argument, or
    the first of BATCH_INPUTS given by name) against ``route``: before any layer runs, and
    also where every adapted layer folds the sequence into its rows (OPT's FFN)."""
    def check(module, args, kwargs):
        given = [a for a in args if isinstance(a, torch.Tensor)] + \
            [kwargs[k] for k in BATCH_INPUTS if isinstance(kwargs.get(k), torch.Tensor)]
        batch = next((t for t in given if t.dim() > 0), None)
        if batch is not None:
            route.check_rows(batch.shape[0])
    return check


def _input_tap(name: str, inputs: dict):
    """A forward pre-hook keeping the input of module ``name`` in ``inputs``."""
    def tap(module, args):
        inputs[name] = args[0]
    return tap


def _routed_hook(layer: LayerAdapters, route: Route, slot_of: dict, inputs: dict):
    """A forward hook adding ``layer``'s routed adapters into its output."""
    def hook(module, args, output):
        x = args[0]
        if torch.is_grad_enabled() and (x.requires_grad or output.requires_grad):
            raise RuntimeError("AdapterBank routes serve inference: run the model under "
                               "torch.no_grad() or torch.inference_mode() (generate() does)")
        output = output.contiguous()
        layer.apply(output, x, route, slot_of, inputs)
        return output
    return hook
