"""save_factors/load_factors: a bit-exact round trip, refused corrupt or malformed files
(AdapterFileError naming the file and the problem), the previous file kept when a save fails."""
import os

import pytest
import torch
from curvature_models import Classifier, batch

from kronops import AdapterFileError, apply_adapters, save_adapters
from kronops.adapters.fileformat import encode
from kronops.curvature import collect, load_factors, save_factors
from kronops.curvature.files import FACTORS
from kronops.s2ft import S2FTInPlaceLinear, S2FTLinear


def factors(dtype=torch.float32, seed=0):
    """Factors of a plain layer with a bias and diagonal, an S²FT rows layer selected by
    index and an S²FT cols layer selected by a range."""
    torch.manual_seed(seed)
    model = Classifier(features=(5, 4), hidden=6)
    model.body = S2FTLinear(model.body, rows=torch.tensor([0, 3, 5]))
    model.head = S2FTInPlaceLinear(model.head, cols=range(2, 5))
    plain = collect(Classifier(hidden=6), [batch(seed)], dtype=dtype, diagonal=True)
    picked = collect(model, [batch(seed)], dtype=dtype)
    return {"plain": plain["head"], "rows": picked["body"], "cols": picked["head"]}


def same(a, b):
    assert set(a) == set(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.tokens, x.bias, x.selection) == (y.tokens, y.bias, y.selection)
        for key in ("a", "g", "diag"):
            u, v = getattr(x, key), getattr(y, key)
            assert (u is None) == (v is None)
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    saved = factors(dtype)
    path = tmp_path / "fisher.safetensors"
    save_factors(saved, path)
    same(load_factors(path), saved)


def test_corrupt_files_are_refused_by_name(tmp_path):
    path = tmp_path / "fisher.safetensors"
    save_factors(factors(), path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-3] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(AdapterFileError, match=f"{str(path)!r}: config or tensor data does not "
                                               "match its checksum"):
        load_factors(path)
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterFileError, match="is not a valid curvature factors file"):
        load_factors(path)
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(AdapterFileError, match="is not a kronops curvature factors file .*"
                                               "save_factors writes them"):
        load_factors(path)
    model = Classifier()
    apply_adapters(model, "krona", target_modules=["head"])
    save_adapters(model, path)
    with pytest.raises(AdapterFileError, match="unsupported format 'kronops-adapters'"):
        load_factors(path)


def test_malformed_layers_are_refused_by_name(tmp_path):
    f = factors()
    tensors = {"plain.a": f["plain"].a, "plain.g": f["plain"].g}
    path = tmp_path / "fisher.safetensors"

    def refused(layers, tensors, message):
        path.write_bytes(encode(dict(layers=layers), tensors, FACTORS))
        with pytest.raises(AdapterFileError, match=message):
            load_factors(path)

    entry = dict(tokens=5, bias=True, selection=None)
    refused({"plain": dict(entry, tokens=0)}, tensors, r"layers\['plain'\]: tokens must be")
    refused({"plain": dict(entry, extra=1)}, tensors, r"layers\['plain'\]: unknown key")
    refused({"plain": entry}, dict(tensors, stray=torch.ones(1)), "'stray'.* belong to no layer")
    refused({"plain": entry, "other": entry}, tensors, r"layers\['other'\]: missing tensor")
    refused({"plain": dict(entry, tokens=5, bias=False, selection=dict(
        side="rows", size=4, range=[3, 9]))}, tensors, r"layers\['plain'\]: rows must satisfy")
    refused({"plain": entry}, dict(tensors, **{"plain.a": f["plain"].g[:2].clone()}),
            r"layers\['plain'\]: a must be a square")


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "fisher.safetensors"
    first = factors(seed=0)
    save_factors(first, path)

    def fail(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match=f"cannot save factors to {str(path)!r}: No space left"):
        save_factors(factors(seed=1), path)
    monkeypatch.undo()
    same(load_factors(path), first)
    assert os.listdir(tmp_path) == ["fisher.safetensors"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="factors"):
        save_factors({}, tmp_path / "f.safetensors")
    f = factors()
    with pytest.raises(TypeError, match="LayerFactors"):
        save_factors({"plain": (f["plain"].a, f["plain"].g)}, tmp_path / "f.safetensors")
    with pytest.raises(FileNotFoundError, match="cannot save factors to"):
        save_factors(f, tmp_path / "missing" / "f.safetensors")
