"""A fingerprint of the base model adapters were trained on, cheap enough for any model size.

``fingerprint(model, names)`` gives per adapted module name {"shape", "dtype", "sample"}: the
weight's shape and dtype as stored, and SAMPLES of its values (all of a smaller weight), as
float32 little-endian hex. The values sit at positions i·step mod n (i < SAMPLES, n the
weight's size, step the odd number nearest n·(√5 − 1)/2: a golden-ratio sequence), which spread
over rows and columns alike; a stride of n / SAMPLES would read one column of a square weight
whose size is a multiple of the row length. Reading SAMPLES values per weight costs
microseconds whatever the model's size; the price is that a base differing in a few weights
only can go unnoticed (a fine-tune, or another checkpoint, changes nearly every weight).

The values, not a hash of them: the same base in another dtype (fp32 training, bf16 serving)
is the same base. ``differences`` compares the values exactly when both dtypes are equal, and
within the coarser dtype's epsilon (relative) otherwise. Weights on the meta device have no
values ("sample": None); their shapes are still compared.
"""
import math
import struct

import torch
from torch import nn

from .errors import AdapterFileError
from .json_checks import expect_keys, is_int

SAMPLES = 32
KEYS = ("dtype", "sample", "shape")
_GOLDEN = (math.sqrt(5) - 1) / 2


def _weight(module: nn.Module) -> torch.Tensor:
    """The base weight of a linear layer, or of the adapter layer wrapping one."""
    return getattr(module, "base", module).weight


def _positions(numel: int) -> torch.Tensor:
    if numel <= SAMPLES:
        return torch.arange(numel)
    step = round(numel * _GOLDEN) | 1
    return torch.arange(SAMPLES) * step % numel


def _entry(w: torch.Tensor) -> dict:
    entry = dict(shape=list(w.shape), dtype=str(w.dtype).removeprefix("torch."), sample=None)
    if not w.is_meta:
        flat = _positions(w.numel()).to(w.device)
        rows, cols = flat // w.shape[1], flat % w.shape[1]  # no copy of a strided weight
        values = w.detach()[rows, cols].to("cpu", torch.float32).tolist()
        entry["sample"] = struct.pack(f"<{len(values)}f", *values).hex()
    return entry


def fingerprint(model: nn.Module, names) -> dict[str, dict]:
    """{name: {"shape", "dtype", "sample"}} of the 2-D weights of the model's linear layers
    ``names`` (an adapter layer's base weight): see the module docstring."""
    return {name: _entry(_weight(model.get_submodule(name))) for name in names}


def _values(entry: dict) -> torch.Tensor:
    data = bytes.fromhex(entry["sample"])
    return torch.tensor(struct.unpack(f"<{len(data) // 4}f", data), dtype=torch.float32)


def _same_values(saved: dict, current: dict) -> bool:
    """The samples (of weights of one shape) agree: exactly for one dtype, within the
    coarser one's epsilon else; unknown (meta) values agree with anything."""
    if saved["sample"] is None or current["sample"] is None:
        return True
    if saved["dtype"] == current["dtype"]:
        return saved["sample"] == current["sample"]
    a, b = _values(saved), _values(current)
    dtypes = [getattr(torch, entry["dtype"]) for entry in (saved, current)]
    if not all(d.is_floating_point for d in dtypes):
        return torch.equal(a, b)
    coarse = max((torch.finfo(d) for d in dtypes), key=lambda f: f.eps)
    return bool(torch.isclose(a, b, rtol=coarse.eps, atol=coarse.tiny, equal_nan=True).all())


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two fingerprints of the same modules, one line per module."""
    lines = []
    for name in sorted(saved):
        a, b = saved[name], current[name]
        if a["shape"] != b["shape"]:
            lines.append(f"{name}: shape {a['shape']} in the file, {b['shape']} in the model")
        elif not _same_values(a, b):
            dtypes = "" if a["dtype"] == b["dtype"] else \
                f" ({a['dtype']} in the file, {b['dtype']} in the model)"
            lines.append(f"{name}: weights differ{dtypes}")
    return lines


def check_fingerprint(base) -> None:
    """``base`` is a fingerprint as ``fingerprint`` makes them (read from a file), or None;
    else ``AdapterFileError`` naming what is wrong."""
    if base is None:
        return
    if not isinstance(base, dict):
        raise AdapterFileError(f"base must be a dict or null, got {type(base).__name__}")
    for name, entry in base.items():
        where = f"base module {name!r}"
        expect_keys(where, entry, KEYS)
        shape, dtype, sample = entry["shape"], entry["dtype"], entry["sample"]
        if not isinstance(shape, list) or len(shape) != 2 or \
                not all(is_int(d) and d > 0 for d in shape):
            raise AdapterFileError(f"{where}: shape must be [rows, columns], positive ints, "
                                   f"got {shape!r}")
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise AdapterFileError(f"{where}: dtype must name a torch dtype, got {dtype!r}")
        length = 8 * min(SAMPLES, math.prod(shape))
        if sample is not None and (not isinstance(sample, str) or len(sample) != length or
                                   any(c not in "0123456789abcdef" for c in sample)):
            raise AdapterFileError(f"{where}: sample must be null or {length} hex digits, "
                                   f"got {sample!r}")


__all__ = ["SAMPLES", "fingerprint", "differences", "check_fingerprint"]
