"""vLLM's linear LoRA layers, also serving kronops adapters per slot.

``KronopsLinearMixin`` goes in front of each of vLLM's linear LoRA layer classes
(``subclasses``): vLLM's ``from_layer`` then wraps every supported linear layer in our
subclass, which keeps all of vLLM's LoRA behaviour and adds:

- one extra LoRA slot, past the ones the LoRA manager hands out and always zero. vLLM's
  PyTorch LoRA ops index the slot stacks with each token's slot, -1 for "no adapter", so
  without it a token with no adapter reads the LoRA of the last slot whenever that slot is
  filled; with it, -1 reads zeros.
- per output slice (q, k, v of a fused qkv projection; gate, up of gate_up; one slice
  otherwise) the kronops adapters of each slot, as ``kronops.serving.layers.LayerAdapters``:
  KronA/LoKr factors grouped by shape, S²FT Δ grouped by side (rows or cols), each slot a
  member named by its index.
- vLLM's LoRA term skipped in a step where no token's slot holds a vLLM LoRA (``routing``:
  kronops slots hold zero LoRA factors); then, each slice's adapters added into that slice of
  the output (a strided view) by ``routed_kron_add`` / ``routed_sparse_add``, for the tokens
  of the slots that hold them, grouped by ``routing``.

Tensor parallelism: ``kronops_part`` says which rows and columns of a slice's whole weight
this rank's layer computes and takes, read off vLLM's own ``slice_lora_b``/``slice_lora_a``
applied to index probes (so every layer kind, GQA head replication included, is cut as vLLM
cuts a LoRA); ``loader`` cuts each update to that part (``sharding``).
"""
import torch

from ..layers import LayerAdapters
from . import routing


class KronopsLinearMixin:
    """What a vLLM linear LoRA layer gains to serve kronops adapters; see the module
    docstring."""

    def create_lora_weights(self, max_loras, lora_config, model_config=None):
        # one more slot than the manager uses: the last, read by index -1, stays zero
        super().create_lora_weights(max_loras + 1, lora_config, model_config)
        self.kronops_max_loras = max_loras
        self.kronops_slices = [LayerAdapters(None) for _ in range(self.n_slices)]
        self.kronops_slot_names = {str(i): i for i in range(max_loras)}

    def reset_lora(self, index: int):
        super().reset_lora(index)
        self.kronops_clear(index)

    def kronops_clear(self, index: int) -> None:
        """Drop slot ``index``'s kronops adapters from every slice."""
        for adapters in self.kronops_slices:
            adapters.remove(str(index))

    def kronops_set(self, index: int, slice_index: int, update) -> None:
        """Serve ``update`` (a ``KronUpdate`` or ``SparseUpdate`` of this slice's (out, in)
        weight, in its dtype and on its device) for the tokens of slot ``index``."""
        if not 0 <= index < self.kronops_max_loras:
            raise IndexError(f"slot {index} is not one of the {self.kronops_max_loras} LoRA slots")
        if not 0 <= slice_index < self.n_slices:
            raise IndexError(f"slice {slice_index} is not one of the layer's {self.n_slices}")
        self.kronops_slices[slice_index].add(str(index), update)

    def kronops_part(self, slice_index: int, out_features: int, in_features: int):
        """(output rows, input columns) of the whole (``out_features``, ``in_features``)
        weight of output slice ``slice_index`` that this rank's layer computes and takes, as
        int64 CPU index tensors; None where it is whole (always at tp = 1). ValueError for
        a sharded layer kind whose cut is not known."""
        from vllm.lora.layers import (ColumnParallelLinearWithLoRA,
                                      MergedColumnParallelLinearWithLoRA,
                                      ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA)
        if self.tp_size == 1 or isinstance(self, ReplicatedLinearWithLoRA):
            return None, None
        if isinstance(self, RowParallelLinearWithLoRA):
            probe = torch.arange(in_features, dtype=torch.float64)[None, :]
            return None, RowParallelLinearWithLoRA.slice_lora_a(self, probe)[0].long()
        probe = torch.arange(out_features, dtype=torch.float64)[:, None]
        if isinstance(self, MergedColumnParallelLinearWithLoRA):
            probes = [None] * self.n_slices
            probes[slice_index] = probe
            return self.slice_lora_b(probes)[slice_index][:, 0].long(), None
        if isinstance(self, ColumnParallelLinearWithLoRA):
            return self.slice_lora_b(probe)[:, 0].long(), None
        raise ValueError(f"vLLM's {type(self).__mro__[2].__name__} is not cut for kronops "
                         f"adapters at tensor_parallel_size {self.tp_size}")

    def kronops_active(self) -> bool:
        return any(adapters.groups for adapters in self.kronops_slices)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if routing.step_has_lora(self.punica_wrapper):
            output = super()._apply_lora_to_output(x, output)
        if not self.kronops_active():
            return output
        y2 = output.flatten(0, -2) if output.dim() > 2 else output
        x2 = x.flatten(0, -2) if x.dim() > 2 else x
        rows = x2.shape[0]
        route = routing.step_route(self.punica_wrapper, rows)
        start = 0
        for size, adapters in zip(self.output_slices, self.kronops_slices):
            if adapters.groups:
                y_slice = y2[:, start:start + size]
                for group in adapters.groups.values():
                    group.apply(y_slice, x2, route, rows, 1, self.kronops_slot_names)
            start += size
        if y2.data_ptr() != output.data_ptr():
            raise RuntimeError("a kronops layer's output could not be updated in place")
        return output


def subclasses(classes) -> tuple[type, ...]:
    """``KronopsLinearMixin`` subclasses of the linear LoRA layer ``classes`` (subclasses
    of vLLM's ``BaseLinearLayerWithLoRA``), in their order, named Kronops + their name."""
    return tuple(type("Kronops" + c.__name__, (KronopsLinearMixin, c),
                      {"__module__": __name__, "__qualname__": "Kronops" + c.__name__})
                 for c in classes)
