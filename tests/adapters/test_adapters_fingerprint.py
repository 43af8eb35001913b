"""Adapter files record a fingerprint of the base model they were trained on: the same base
loads silently (also in another dtype, after in-place training or co-permutation), another
base of the same architecture warns, or is refused with ``strict=True`` and by an
``AdapterBank``; files saved before fingerprints (format version 2) still load, unchecked."""
import copy
import json
import warnings

import pytest
import torch
from adapter_files import load_refused, out, raw_read, write_file
from models import randomize_b, tiny_llama

from kronops.adapters import (AdapterFileError, BaseMismatchWarning, adapter_modules,
                              apply_adapters, load_adapters, read_adapters, save_adapters)
from kronops.adapters.fingerprint import SAMPLES, fingerprint
from kronops.s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from kronops.serving import AdapterBank

CONFIG = {"krona": dict(rank=2, alpha=3), "krona_block": dict(rank=2),
          "s2ft": dict(heads=2, channels=3, seed=1),
          "s2ft_inplace": dict(heads=2, channels=3, seed=1, mode="inplace", permute=True)}


def base(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    return tiny_llama(dtype)


def trained(method: str):
    """A seed-0 base with ``method``'s adapters, given nonzero values (in place: the
    selected rows/columns of the weights changed)."""
    model = base()
    apply_adapters(model, method.removesuffix("_inplace"), **CONFIG[method])
    randomize_b(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, S2FTInPlaceLinear):
                dim = 1 if m.mode == "cols" else 0
                m.base_weight.index_fill_(dim, m.indices(), 0.1)
            elif isinstance(m, S2FTLinear):
                m.delta.fill_(0.1)
    return model


@pytest.fixture(params=list(CONFIG))
def saved(request, tmp_path):
    """(method, trained model, its file)."""
    model = trained(request.param)
    path = tmp_path / f"{request.param}.safetensors"
    save_adapters(model, path)
    return request.param, model, path


def silently(call):
    """``call()``, failing on a BaseMismatchWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        return call()


def test_the_same_base_loads_silently(saved):
    """Also after in-place training of the selected weights and co-permutation (the
    fingerprint is taken when the adapters are applied), into a plain model or into one
    with the same adapters, and with strict=True."""
    method, model, path = saved
    _, config = read_adapters(path)
    assert config["format_version"] == 3 and set(config["base"]) == set(adapter_modules(model))
    fresh = silently(lambda: load_adapters(base(), path, strict=True))
    torch.testing.assert_close(out(fresh), out(model), rtol=1e-5, atol=1e-5)
    silently(lambda: load_adapters(fresh, path, strict=True))  # into the same adapters
    silently(lambda: save_adapters(fresh, path))  # the fingerprint a loaded model keeps
    assert read_adapters(path)[1]["base"] == config["base"]


def test_another_base_warns_by_default_and_is_refused_with_strict(saved):
    method, model, path = saved
    other = base(seed=1)  # the same architecture, other weights
    load_refused(other, path, f"{str(path)!r} was saved from another base "
                 r"model: \d+ of \d+ adapted module\(s\) differ", strict=True)
    with pytest.warns(BaseMismatchWarning, match="weights differ") as caught:
        load_adapters(other, path)
    assert "strict=True" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line
    adapted = base(seed=1)  # a model that has these adapters already, on another base
    apply_adapters(adapted, method.removesuffix("_inplace"), **CONFIG[method])
    with pytest.raises(AdapterFileError, match="another base model"):
        load_adapters(adapted, path, strict=True)


def test_an_adapter_bank_refuses_a_file_of_another_base(tmp_path):
    path = tmp_path / "krona.safetensors"
    save_adapters(trained("krona"), path)
    bank = AdapterBank(base(seed=1))
    state = copy.deepcopy(bank.model.state_dict())
    with pytest.raises(AdapterFileError, match="another base model"):
        bank.load("krona", path)
    assert bank.names == []
    assert all(torch.equal(v, state[k]) for k, v in bank.model.state_dict().items())
    silently(lambda: AdapterBank(base()).load("krona", path))


def test_the_same_base_in_another_dtype_is_the_same_base(tmp_path):
    """fp64-trained adapters served on the base cast to bf16, fp16 or fp32: no warning; a
    bf16 base with other weights still differs."""
    path = tmp_path / "krona.safetensors"
    save_adapters(trained("krona"), path)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        silently(lambda: load_adapters(base(dtype=dtype), path, strict=True))
        silently(lambda: AdapterBank(base(dtype=dtype)).load("krona", path))
    with pytest.raises(AdapterFileError, match="another base model"):
        load_adapters(base(seed=1, dtype=torch.bfloat16), path, strict=True)


def test_a_shape_difference_is_named(tmp_path):
    """A base whose adapted module differs in shape (here: in the fingerprint only, as a
    checksum-valid file for a differently shaped base would say)."""
    path = tmp_path / "krona.safetensors"
    save_adapters(trained("krona"), path)
    tensors, config = raw_read(path)
    name = "model.layers.0.mlp.down_proj"
    config["base"][name]["shape"] = [40, 48]  # transposed
    write_file(path, tensors, config)
    with pytest.raises(AdapterFileError, match=rf"{name}: shape \[40, 48\] in the file, "
                                               r"\[48, 40\] in the model"):
        load_adapters(base(), path, strict=True)


def test_a_file_without_a_fingerprint_still_loads_unchecked(tmp_path):
    """A version-2 file (as kronops wrote it before fingerprints: the same config without
    "base", checksum over it) loads into any base of the right shapes, also with strict,
    and the model then records its own base's fingerprint."""
    model = trained("krona")
    path = tmp_path / "v2.safetensors"
    save_adapters(model, path)
    tensors, config = raw_read(path)
    del config["base"]
    config["format_version"] = 2
    write_file(path, tensors, config)
    fresh = silently(lambda: load_adapters(base(), path, strict=True))
    assert torch.equal(out(fresh), out(model))
    silently(lambda: load_adapters(base(seed=1), path, strict=True))
    silently(lambda: AdapterBank(base(seed=1)).load("old", path))
    assert fresh._kronops.base == fingerprint(base(), list(config["layers"]))
    config["base"] = None  # version 2 has no such key: refused by name
    write_file(path, tensors, config)
    with pytest.raises(AdapterFileError, match="unknown key.*'base'"):
        load_adapters(base(), path)


def test_the_fingerprint_is_covered_by_the_checksum(tmp_path):
    path = tmp_path / "krona.safetensors"
    save_adapters(trained("krona"), path)
    data = path.read_bytes()
    _, config = raw_read(path)
    sample = next(iter(config["base"].values()))["sample"]
    old = sample[:8].encode()
    new = bytes([old[0] ^ 1]) + old[1:]  # one bit of one sampled value
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    with pytest.raises(AdapterFileError, match="does not match its checksum"):
        load_adapters(base(), path)


def test_fingerprint_samples_each_weight_across_rows_and_columns():
    """SAMPLES values per weight (all of a smaller one), spread over rows and columns (a
    stride that is a multiple of the row length would see one column only); meta weights
    give no values."""
    w = torch.arange(48 * 40, dtype=torch.float32).reshape(40, 48)
    layer = torch.nn.Linear(48, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    entry = fingerprint(layer, [""])[""]
    assert entry["shape"] == [40, 48] and entry["dtype"] == "float32"
    values = torch.frombuffer(bytearray.fromhex(entry["sample"]), dtype=torch.float32)
    assert values.numel() == SAMPLES
    rows, cols = values.long() // 48, values.long() % 48
    assert rows.unique().numel() > SAMPLES // 2 and cols.unique().numel() > SAMPLES // 2
    small = torch.nn.Linear(3, 2)
    assert len(fingerprint(small, [""])[""]["sample"]) == 8 * 6
    with torch.device("meta"):
        meta = torch.nn.Linear(48, 40)
    assert fingerprint(meta, [""])[""]["sample"] is None
    assert json.dumps(fingerprint(tiny_llama(), ["lm_head"]))  # plain JSON
