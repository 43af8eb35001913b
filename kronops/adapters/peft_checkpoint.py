"""A PEFT LoKr checkpoint directory (``adapter_config.json`` + ``adapter_model.safetensors``,
as ``PeftModel.save_pretrained`` writes it) read as a kronops adapter file, without peft.

``read_peft_lokr(folder)`` gives what ``fileformat.read_adapters`` gives for a kronops file
(tensors, config) of the same adapters: per PEFT LoKr layer the KronALinear (full w2) or
LoKrLinear (decomposed w2) that ``peft.kron_layer`` builds from its factors (``lokr_w1`` or
``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``) and its r and alpha
(``rank_pattern``/``alpha_pattern`` resolved as PEFT does), s = alpha / r. The factors are
kept as they are: the adapter is exact, never truncated. ``files.check_read`` then checks
them against a model like any file (names, shapes). There is no base fingerprint.

Refused (AdapterFileError naming the folder and the reason): another PEFT type, a missing or
``.bin``-only checkpoint, ``modules_to_save``, convolution LoKr (``lokr_t2``, 4-D factors),
tensors that are not LoKr factors, a layer with a factor missing. rank_dropout and
module_dropout are training-time only and ignored.
"""
import json
import os
import re

import torch

from .errors import AdapterFileError, naming
from .lokr import layer_config
from .methods import krona
from .methods.kron_layers import meta_linear
from .peft import PEFT_PREFIX, kron_layer
from .targets import own_parameters

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def peft_type(folder) -> str | None:
    """The ``peft_type`` of the PEFT checkpoint in ``folder`` (None: no adapter_config.json,
    or one without a readable peft_type)."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            found = json.load(f).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def _pattern(patterns: dict, name: str, default):
    """PEFT's per-layer value: the first key of ``patterns`` matching the end of ``name``
    (as a regular expression after a dot), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {factor name: tensor}} of PEFT's state-dict keys; AdapterFileError for
    keys that are no LoKr factor of a linear layer."""
    layers = {}
    for key, t in tensors.items():
        module, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if factor == "lokr_t2" or (factor in FACTORS and t.dim() != 2):
            raise AdapterFileError(f"{key} is a convolution LoKr factor (lokr_t2 or a 4-D "
                                   "weight): only linear layers are read", whole_file=True)
        if factor not in FACTORS or not key.startswith(PEFT_PREFIX):
            raise AdapterFileError(f"{key} is not a LoKr factor ({', '.join(FACTORS)} under "
                                   f"{PEFT_PREFIX!r})", whole_file=True)
        layers.setdefault(module, {})[factor] = t
    return layers


def _factor(found: dict, name: str, module: str) -> tuple:
    """("full", W) or ("low", U, V) of factor ``name`` (lokr_w1 or lokr_w2) of ``module``."""
    if name in found:
        return ("full", found[name])
    if f"{name}_a" in found and f"{name}_b" in found:
        return ("low", found[f"{name}_a"], found[f"{name}_b"])
    raise AdapterFileError(f"{module} has no {name} (nor {name}_a and {name}_b)",
                           whole_file=True)


def read_peft_lokr(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of the PEFT LoKr checkpoint in ``folder`` as a kronops "krona"
    adapter file holds them (module docstring); AdapterFileError naming the folder."""
    from safetensors.torch import load_file
    folder = os.fspath(folder)
    with naming(folder):
        kind = peft_type(folder)
        if kind != "LOKR":
            raise AdapterFileError(f"is not a PEFT LoKr checkpoint ({CONFIG} gives peft_type "
                                   f"{kind!r})", whole_file=True)
        with open(os.path.join(folder, CONFIG)) as f:
            peft = json.load(f)
        if peft.get("modules_to_save"):
            raise AdapterFileError(f"also trains whole modules (modules_to_save "
                                   f"{peft['modules_to_save']}): only LoKr layers are read",
                                   whole_file=True)
        if not os.path.isfile(os.path.join(folder, WEIGHTS)):
            raise AdapterFileError(f"has no {WEIGHTS} (PEFT's .bin checkpoints are not read)",
                                   whole_file=True)
        for key in ("r", "alpha"):
            if not isinstance(peft.get(key), (int, float)) or isinstance(peft[key], bool):
                raise AdapterFileError(f"{CONFIG} has no number {key!r}", whole_file=True)
        try:
            stored = load_file(os.path.join(folder, WEIGHTS))
        except Exception as e:
            raise AdapterFileError(f"{WEIGHTS} is unreadable ({type(e).__name__}: {e})",
                                   whole_file=True) from None
        layers, tensors = {}, {}
        for module, found in sorted(_layers(stored).items()):
            w1, w2 = _factor(found, "lokr_w1", module), _factor(found, "lokr_w2", module)
            r = _pattern(peft.get("rank_pattern") or {}, module, peft["r"])
            alpha = _pattern(peft.get("alpha_pattern") or {}, module, peft["alpha"])
            (a1, a2), (b1, b2) = ((w[1].shape[0], w[-1].shape[1]) for w in (w1, w2))
            try:
                layer = kron_layer(meta_linear(a2 * b2, a1 * b1), w1, w2, r, alpha)
            except (ValueError, RuntimeError) as e:
                raise AdapterFileError(f"{module}: its factors do not make a LoKr layer "
                                       f"({e})", whole_file=True) from None
            layers[module] = layer_config(layer)
            tensors.update({f"{module}.{p}": t.data for p, t in own_parameters(layer).items()})
    return tensors, dict(method=krona.NAME, layers=layers, train_modules=[], base=None)


__all__ = ["read_peft_lokr", "peft_type"]
