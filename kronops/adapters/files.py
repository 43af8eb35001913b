"""Saving and loading a model's adapters, every method: ``save_adapters(model, path)`` /
``load_adapters(model, path)``. The file format is ``fileformat``'s, the atomic write
``atomic``'s; what each method puts in a file and takes back is its module's (``methods``).

The base model: a file records the ``fingerprint`` of the base the adapters were trained on
(taken when the adapters were applied; null when unknown). Loading into a base whose
fingerprint differs (another checkpoint of the same architecture) warns
(``BaseMismatchWarning``), or raises ``AdapterFileError`` with ``strict=True``; the same
base in another dtype is the same base. Files of format version 2 have no fingerprint and
load with no such check, also with ``strict=True``.

Loading checks everything (file integrity, checksum, config structure, module names, exact
shapes, the method's own checks, base with ``strict=True``) before it changes the model
(``check_load`` gives a ``CheckedFile``; ``AdapterBank`` serves from one too): on any error
it raises ``AdapterFileError`` (a ValueError) naming the file and the problem, and the model
is untouched. A plain model gets the saved adapters applied (S²FT: the plan in the saved
mode, not permuted), in the training mode of the Linears they wrap (a model in eval() mode
stays in eval mode); a model with adapters must hold exactly the saved ones (S²FT: the
same plan and mode, co-permuted or not).
"""
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from .apply import check_overlap, freeze_except, summarize
from .atomic import write_atomic
from .errors import AdapterFileError, BaseMismatchWarning, naming
from .fileformat import encode, read_adapters
from .fingerprint import differences, fingerprint
from .methods import adapter_modules, method_named
from .sharded import whole
from .state import STATE, AdapterState, adapter_state


def _collect(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config content, tensors) describing the model's adapters and train modules."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("model has no kronops adapters (no KronA or S²FT layers): "
                         "apply_adapters (or from_peft) first")
    content, tensors = method_named(state.method).save(model, state)
    for name in state.train_modules:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{name}.{pname}"] = p
    content.update(method=state.method, train_modules=list(state.train_modules),
                   base=state.base)
    return content, {k: whole(t).detach().to("cpu").contiguous() for k, t in tensors.items()}


def save_adapters(model: nn.Module, path) -> None:
    """Write the model's adapters to ``path`` (one safetensors file), atomically.

    Under torch.distributed every rank must call it (FSDP2 shards are gathered, a
    collective); only rank 0 writes. See ``fileformat`` for the format and the checksum,
    ``atomic`` for temporary files and errors.
    """
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    content, tensors = _collect(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0:
        return
    write_atomic(path, encode(content, tensors))


@dataclass(frozen=True)
class CheckedFile:
    """An adapter file read and checked against a model, nothing changed yet: ``method``
    (its module in ``methods``), ``spec`` (the method's: which adapters go where),
    ``tensors``, ``train_modules``; ``state``: the model's AdapterState before loading (None:
    a plain model); ``base``: the base fingerprint the loaded model records;
    ``base_mismatch``: the error ``strict=True`` raises when the file was saved from another
    base model, else None."""
    method: ModuleType
    spec: object
    tensors: dict[str, torch.Tensor]
    train_modules: list[str]
    state: AdapterState | None
    base: dict | None
    base_mismatch: AdapterFileError | None


def _check_adapters(model: nn.Module, method: str) -> AdapterState | None:
    """The model's state, where loading a ``method`` file can work: a plain model, or one
    with that method's unmerged adapters."""
    state = adapter_state(model)
    if state is not None and state.method != method:
        raise AdapterFileError(f"holds {method!r} adapters, the model has {state.method!r} "
                               "adapters", whole_file=True)
    layers = adapter_modules(model)
    if state is None and layers:
        raise AdapterFileError("the model has adapter layers not set up by "
                               "kronops.apply_adapters")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise AdapterFileError(f"the model's adapters are merged (e.g. {merged[0]}): "
                               "unmerge_adapters(model) before loading")
    return state


def _check_train_modules(model: nn.Module, train: list[str], state, touched: list[str]) -> dict:
    """The file's train modules exist in the model (the same as the model's, if adapted) and
    stay clear of the adapters; their parameters' shapes by tensor name."""
    modules = dict(model.named_modules())
    if state is not None and list(state.train_modules) != train:
        raise AdapterFileError(f"train_modules {train} in the file, {state.train_modules} in "
                               "the model")
    for name in train:
        if name not in modules:
            raise AdapterFileError(f"train module {name!r} is not in the model")
    try:
        check_overlap(train, touched)
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
    return {f"{name}.{n}": p.shape for name in train for n, p in modules[name].named_parameters()}


def _check_tensors(model: nn.Module, tensors: dict, expected: dict[str, torch.Size],
                   fixed: dict[str, torch.Tensor]) -> None:
    """The file holds exactly the ``expected`` tensors, of those shapes; ``fixed`` ones
    (int64) with those values, every other one floating point."""
    modules = dict(model.named_modules())
    for key in sorted(set(tensors) - set(expected)):
        layer = key.rpartition(".")[0]
        if layer not in modules:
            raise AdapterFileError(f"{key!r} does not fit the model: layer {layer!r} is not a "
                                   "module of the model")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"does not fit the model: tensors missing from the file "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''}, not in the "
                               f"model {extra[:4]}{'...' if len(extra) > 4 else ''}",
                               whole_file=True)
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(f"{key} has values of shape {tuple(tensors[key].shape)} in "
                                   f"the file, {tuple(shape)} in the model")
    for key, values in fixed.items():
        if tensors[key].dtype != torch.int64 or not torch.equal(tensors[key], values):
            raise AdapterFileError(f"{key} differs from the selection plan")
    for key, t in tensors.items():
        if key not in fixed and not t.is_floating_point():
            raise AdapterFileError(f"{key} has dtype {t.dtype}, expected floating point")


def _compare_base(model: nn.Module, state, saved: dict | None, adapted: list[str]):
    """(the model's base fingerprint over the ``adapted`` modules: recorded in its state, or
    taken now from a plain model; an AdapterFileError when the file's ``saved`` one
    differs, or None)."""
    if saved is not None and set(saved) != set(adapted):
        raise AdapterFileError(
            f"the base fingerprint covers other modules than the adapters (missing "
            f"{sorted(set(adapted) - set(saved))[:3]}, not adapted "
            f"{sorted(set(saved) - set(adapted))[:3]})")
    current = fingerprint(model, adapted) if state is None else state.base
    if saved is None or current is None:
        return current, None
    found = differences(saved, current)
    if not found:
        return current, None
    return current, AdapterFileError(
        f"was saved from another base model: {len(found)} of {len(saved)} adapted module(s) "
        f"differ, e.g. {'; '.join(found[:2])}", whole_file=True)


def prepare_load(model: nn.Module, tensors: dict, config: dict) -> CheckedFile:
    """Check a read file (``read_adapters``) against ``model`` without changing it: what
    loading it does. AdapterFileError naming the first problem."""
    method = method_named(config["method"])
    state = _check_adapters(model, method.NAME)
    spec = method.read_spec(model, config, tensors, state)
    train = list(config["train_modules"])
    expected = spec.expected(model)
    expected.update(_check_train_modules(model, train, state, spec.touched))
    _check_tensors(model, tensors, expected, spec.fixed)
    base, mismatch = _compare_base(model, state, config.get("base"), spec.modules)
    return CheckedFile(method, spec, tensors, train, state, base, mismatch)


def check_load(model: nn.Module, path, *, strict: bool = False) -> CheckedFile:
    """The adapter file at ``path`` read and checked against ``model`` without changing it
    (``prepare_load``); AdapterFileError naming the file and the problem (with ``strict``,
    also a file saved from another base model)."""
    tensors, config = read_adapters(path)
    return check_read(model, path, tensors, config, strict=strict)


def check_read(model: nn.Module, path, tensors: dict, config: dict, *,
               strict: bool = False) -> CheckedFile:
    """``check_load`` of adapters already read from ``path`` (``read_adapters``, or another
    reader giving the same (tensors, config))."""
    with naming(path):
        try:
            checked = prepare_load(model, tensors, config)
        except AdapterFileError:
            raise
        except Exception as e:  # a file malformed in a way no check names
            raise AdapterFileError(f"malformed adapter file ({type(e).__name__}: {e})") \
                from None
        if strict and checked.base_mismatch:
            raise checked.base_mismatch
    return checked


def load_adapters(model: nn.Module, path, *, strict: bool = False,
                  verbose: bool = False) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model`` (in place) and return it.

    A plain model gets the saved adapters applied (same module names and exact shapes
    needed; S²FT: the saved plan, in the saved mode, in the original layout), in the
    training mode of the Linears they wrap (loading into an eval() model keeps it in eval
    mode); a model with adapters must hold exactly the saved ones. Any mismatch, a corrupt,
    truncated or malformed file: ``AdapterFileError`` (a ValueError) naming the problem,
    and the model is untouched.

    A file saved from another base model (its base fingerprint differs: same architecture,
    other weights) loads with a ``BaseMismatchWarning``; with ``strict=True`` it raises
    ``AdapterFileError`` and changes nothing. The same base in another dtype is the same
    base. Files without a fingerprint (format version 2) load unchecked, strict or not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    checked = check_load(model, path, strict=strict)
    if checked.base_mismatch:
        warnings.warn(f"{checked.base_mismatch.about(path)}; load_adapters(..., strict=True) "
                      "refuses such a file", BaseMismatchWarning, stacklevel=2)

    # Everything checked: now change the model.
    if checked.state is None:
        setattr(model, STATE, checked.spec.apply(model, checked.train_modules, checked.base))
    checked.spec.load(model, checked.tensors)
    with torch.no_grad():
        for name in checked.train_modules:
            for pname, p in model.get_submodule(name).named_parameters():
                p.copy_(checked.tensors[f"{name}.{pname}"])
    freeze_except(model, checked.train_modules)
    if verbose:
        print(summarize(model))
    return model


__all__ = ["save_adapters", "load_adapters", "check_load", "prepare_load", "CheckedFile"]
