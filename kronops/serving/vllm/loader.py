"""kronops adapters loaded for vLLM's LoRA manager: per vLLM module and output slice the
adapter's ``KronUpdate``/``SparseUpdate``.

A ``LoRARequest``'s ``lora_path`` is ours (``is_kronops_path``) when it is a file written by
``kronops.save_adapters``, a directory holding one such file and no adapter_config.json, or
a PEFT LoKr checkpoint directory (``peft_type`` "LOKR", read exactly by
``read_peft_lokr``); any other directory (PEFT LoRA) goes to vLLM's own loader. It is read
and checked by ``check_read`` against the Hugging Face model of the served config, built on
the meta device with each linear layer vLLM wraps (q, k, v of qkv_proj; gate, up of
gate_up_proj; ...) given its weight from the served checkpoint (``checkpoint``). So the
file's checks are the ones ``load_adapters`` makes, including the base model's fingerprint
(strict: a file saved from another base model is refused), and in-place S²FT files give Δ
against the served weights.

With tensor parallelism each update is cut to the rows and columns this rank's layer
computes and takes (``layers.KronopsLinearMixin.kronops_part``, ``sharding``).

Refused, with the reason: files that also train whole modules, KronA^B (sub-layer)
adapters, adapters on modules vLLM does not wrap in a LoRA layer (e.g. lm_head), quantized
layers, and Kronecker updates whose shard is no Kronecker product (a rank's rows or
columns cutting through blocks of B).
"""
import dataclasses
import os

import torch
from torch import nn

from ...adapters.errors import AdapterFileError, naming
from ...adapters.fileformat import read_adapters
from ...adapters.files import check_read
from ...adapters.methods.updates import KronUpdate, SparseUpdate
from ...adapters.peft_checkpoint import peft_type, read_peft_lokr
from . import checkpoint, sharding

SKELETON = "_kronops_skeleton"  # the LoRA manager's attribute caching (model, table)


def is_kronops_path(path) -> bool:
    """A LoRA path kronops loads: a file, a directory without adapter_config.json, or a
    PEFT LoKr checkpoint directory (a PEFT LoRA directory is vLLM's)."""
    if not isinstance(path, str):
        return False
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return True
    return os.path.isdir(path) and peft_type(path) in (None, "LOKR")


def read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of the adapters at ``path`` (``is_kronops_path``), as
    ``read_adapters`` gives them for a kronops file."""
    if not os.path.isdir(path):
        return read_adapters(path)
    if peft_type(path) == "LOKR":
        return read_peft_lokr(path)
    found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if len(found) != 1:
        raise AdapterFileError(f"holds {len(found)} .safetensors files {found[:3]}: a kronops "
                               "adapter directory holds one adapter file (or a PEFT LoKr "
                               "checkpoint)", whole_file=True).about(path)
    return read_adapters(os.path.join(path, found[0]))


def slices(manager) -> dict[str, tuple[str, int]]:
    """{vLLM name of a projection: (the LoRA-wrapped module computing it, its output slice)},
    e.g. ...self_attn.k_proj -> (...self_attn.qkv_proj, 1)."""
    table = {}
    for name in manager.modules:
        for i, sub in enumerate(manager.packed_modules.get(name, [name])):
            table[sub] = (name, i)
    return table


def _out_features(layer, index: int) -> int | None:
    """The rows of output slice ``index`` of a wrapped vLLM layer, when it says."""
    sizes = getattr(layer, "output_slices", None)
    return sizes[index] if sizes is not None and index < len(sizes) else None


def skeleton(manager, model_config) -> tuple[nn.Module, dict[str, tuple[str, int]]]:
    """(the Hugging Face model of the served config on the meta device, each linear layer
    vLLM wraps given its weight from the served checkpoint (``checkpoint``: views of the
    files, no copy); {its name: (vLLM module, slice)}), built once per LoRA manager."""
    cached = getattr(manager, SKELETON, None)
    if cached is not None:
        return cached
    from transformers import AutoModelForCausalLM
    config = getattr(manager.model, "config", None)
    if config is None or model_config is None:
        raise AdapterFileError(f"vLLM's {type(manager.model).__name__} has no Hugging Face "
                               "config or model path to check kronops adapter files against")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stored = checkpoint.weights(checkpoint.folder(model_config.model,
                                                  getattr(model_config, "revision", None)))
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    table, found = slices(manager), {}
    for hf_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        renamed = mapper.get_rename_mapper().apply_list([hf_name]) if mapper else [hf_name]
        if len(renamed) != 1 or renamed[0] not in table:
            continue
        wrapped, index = table[renamed[0]]
        w = stored.get(hf_name + ".weight")
        if w is None:
            raise AdapterFileError(f"the served checkpoint has no {hf_name}.weight to check "
                                   "kronops adapter files against")
        layer = manager.modules[wrapped]
        rows = _out_features(layer, index) if getattr(layer, "tp_size", 1) == 1 else None
        if tuple(w.shape) != tuple(module.weight.shape) or rows not in (None, w.shape[0]):
            raise AdapterFileError(f"{hf_name} is {tuple(module.weight.shape)} in the Hugging "
                                   f"Face model and {tuple(w.shape)} in the checkpoint; slice "
                                   f"{index} of vLLM's {wrapped} has {rows} rows")
        module.weight = nn.Parameter(w, requires_grad=False)
        found[hf_name] = (wrapped, index)
    setattr(manager, SKELETON, (model, found))
    return model, found


def _served(update, layer, name: str, index: int, shape: tuple[int, int]):
    """``update`` of output slice ``index`` (a whole weight of ``shape``) of the wrapped vLLM
    ``layer`` (``name``), cut to this rank's part (``sharding``; None: nothing of it there),
    in the layer's dtype and on its device."""
    w = getattr(layer.base_layer, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise AdapterFileError(f"vLLM's {name} has no floating-point weight (quantized?): "
                               "kronops adapters are served on unquantized layers only")
    try:
        update = sharding.shard(update, *layer.kronops_part(index, *shape))
    except ValueError as e:
        raise AdapterFileError(f"{name} (slice {index}, {shape[0]}x{shape[1]}) cannot be "
                               f"served at tensor_parallel_size {layer.tp_size}: {e}; serve it "
                               "with a smaller tensor_parallel_size") from None
    if update is None:
        return None
    if isinstance(update, KronUpdate):
        return dataclasses.replace(update, a=update.a.to(w.device, w.dtype),
                                   b=update.b.to(w.device, w.dtype))
    return SparseUpdate(update.selection.to(w.device), update.delta.to(w.device, w.dtype))


def load(manager, model_config, path) -> dict[str, dict[int, KronUpdate | SparseUpdate]]:
    """{vLLM module: {output slice: update}} of the adapters at ``path`` (``is_kronops_path``),
    read and checked against the model ``manager`` (vLLM's LoRA model manager) serves and
    cut to this rank's part; AdapterFileError naming the path and what does not fit."""
    path = os.path.expanduser(path)
    with naming(path):
        model, found = skeleton(manager, model_config)
    tensors, config = read(path)
    checked = check_read(model, path, tensors, config, strict=True)
    with naming(path):
        if checked.train_modules:
            raise AdapterFileError(f"also trains whole modules {checked.train_modules}, which "
                                   "vLLM cannot hold per request", whole_file=True)
        missing = [m for m in checked.spec.modules if m not in found]
        if missing:
            raise AdapterFileError(f"adapts {missing[:3]}, which vLLM does not serve in a LoRA "
                                   f"layer (served: {sorted(found)[:3]}...)", whole_file=True)
        updates = checked.spec.serve(model, checked.tensors)
        served = {}
        for name, update in updates.items():
            if isinstance(update, KronUpdate) and (update.source is not None
                                                   or update.residual is not None):
                raise AdapterFileError(f"{name} has a KronA^B (sub-layer) adapter, which is not "
                                       "served in vLLM: only KronA/LoKr and S²FT are")
            wrapped, index = found[name]
            part = _served(update, manager.modules[wrapped], wrapped, index,
                           tuple(model.get_submodule(name).weight.shape))
            if part is not None:
                served.setdefault(wrapped, {})[index] = part
    return served
