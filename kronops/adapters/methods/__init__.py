"""Adapter methods, one module each, and the registry (``METHODS``) from a method's name to
its module: model-level code (``apply``, ``files``, ``kronops.serving``) asks the method's
module and never branches on the name. A new method is one module with the hooks below and
one entry in ``METHODS``.

A method module has
  NAME          its name, as ``apply_adapters(model, NAME)`` and files give it
  LAYERS        the adapter layer classes it puts in a model
  FILE_KEYS     its keys in an adapter file's config
  Config        a frozen dataclass of its ``apply_adapters`` arguments, checked when made
  spec(model, config, target_modules) -> Spec        what goes where, checked against the
                model, nothing changed yet
  check_file(config)                   its FILE_KEYS' values well-formed (AdapterFileError)
  read_spec(model, config, tensors, state) -> Spec   a file's adapters checked against the
                model (and its adapters, ``state`` not None); AdapterFileError
  save(model, state) -> (config entries, tensors)    what a file holds for its adapters
  mergeable(layers, *, unload) -> layers             those ``merge_adapters`` merges (a
                ValueError where its adapters cannot be merged)
  check_disable(layers)                a ValueError where ``disable_adapters`` cannot work
and its Spec
  modules, touched    the adapted modules (fingerprinted); every module the adapters use
  fixed               file tensors whose values the spec fixes (S²FT's indices)
  expected(model)     the file tensors it needs, by name, with their shapes
  apply(model, train_modules, base) -> AdapterState  build the layers on a plain model
  load(model, tensors)                 a file's values into the built layers
  serve(model, tensors) -> {module: KronUpdate | SparseUpdate}  for ``AdapterBank``
"""
import dataclasses

from torch import nn

from ..targets import modules_of
from . import krona, krona_block, s2ft

METHODS = {m.NAME: m for m in (krona, krona_block, s2ft)}
ADAPTER_LAYERS = tuple(t for m in METHODS.values() for t in m.LAYERS)


def method_named(name: str):
    """The module of method ``name``; ValueError naming the methods."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def configure(method, options: dict):
    """``method.Config`` from ``apply_adapters``' keyword arguments: TypeError naming unknown
    ones, the Config's own checks for the values."""
    allowed = [f.name for f in dataclasses.fields(method.Config)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown config for method={method.NAME!r}: {', '.join(unknown)}; "
                        f"allowed: {', '.join(allowed)}")
    return method.Config(**options)


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's kronops adapter layers, of every method, by name."""
    return modules_of(model, ADAPTER_LAYERS)


__all__ = ["METHODS", "ADAPTER_LAYERS", "method_named", "configure", "adapter_modules"]
