"""Helpers of the adapter file tests: a model's outputs, a snapshot of it, the check that a
refused load left it untouched (``load_refused``); adapter files written and read without the
library's checks."""
import copy
import json
import struct

import pytest
import torch

from kronops.adapters import AdapterFileError, load_adapters
from kronops.adapters.fileformat import checksum

X = torch.randint(0, 50, (2, 7))


def out(model, x=X):
    with torch.no_grad():
        result = model(input_ids=x)
    return result.logits


def snapshot(model):
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()},
            copy.deepcopy(getattr(model, "_kronops", None)))


def assert_untouched(model, before):
    types, params, state = snapshot(model)
    assert types == before[0]
    assert params.keys() == before[1].keys()
    for n, (grad, value) in params.items():
        assert grad == before[1][n][0] and torch.equal(value, before[1][n][1]), n
    assert state == before[2]


def load_refused(model, path, match=None, **options):
    """Loading ``path`` into ``model`` raises an AdapterFileError (matching ``match``) and
    leaves the model untouched; returns the message."""
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match) as info:
        load_adapters(model, path, **options)
    assert_untouched(model, before)
    return str(info.value)


def write_file(path, tensors, config, sign=True, list_tensors=True):
    """An adapter file of these tensors and this config; ``sign``: with a checksum that fits
    (as a careful forger, or a buggy writer, would make), ``list_tensors``: and the config's
    tensor list made to fit the tensors."""
    from safetensors.torch import save
    config = copy.deepcopy(config)
    if sign:
        if list_tensors and isinstance(config.get("tensors"), dict):
            config["tensors"] = {k: dict(shape=list(t.shape),
                                         dtype=str(t.dtype).replace("torch.", ""))
                                 for k, t in tensors.items()}
        config["sha256"] = checksum(config, tensors)
    path.write_bytes(save(tensors, metadata={"kronops": json.dumps(config)}))


def raw_read(path):
    """(tensors, config) of a file without any check."""
    from safetensors.torch import load
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return load(data), json.loads(json.loads(data[8:8 + n])["__metadata__"]["kronops"])
