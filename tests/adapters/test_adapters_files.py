"""Adapter files against damage and misuse: the checksum covers the config as well as the
tensors; malformed files (keys lost, names corrupted, wrong types, transposed tensors, random
bit flips, truncations) raise AdapterFileError with the model untouched; saving removes its
temporary files on failure and after a kill, follows the umask, and names the user's path."""
import copy
import json
import os
import random
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from adapter_files import assert_untouched, load_refused, out, raw_read, snapshot, write_file
from models import randomize_b, tiny_bert, tiny_llama

from kronops.adapters import (AdapterFileError, Plan, apply_adapters, load_adapters,
                              read_adapters, save_adapters, select)
from kronops.adapters.atomic import TMP_SUFFIX, host_name
from kronops.adapters.fileformat import checksum
from kronops.s2ft.modules import S2FTLinear


def krona_model():
    torch.manual_seed(0)
    model = tiny_llama()
    apply_adapters(model, rank=2, alpha=3, target_modules=["q_proj", "k_proj", "down_proj"])
    randomize_b(model)
    return model


def s2ft_model():
    torch.manual_seed(0)
    model = tiny_llama()
    apply_adapters(model, "s2ft", heads=2, channels=3, seed=1, train_modules=["lm_head"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, S2FTLinear):
                m.delta.normal_(std=0.2)
        model.lm_head.weight.normal_(std=0.05)
    return model


METHODS = {"krona": krona_model, "s2ft": s2ft_model}


def fresh_base():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture(params=list(METHODS))
def saved(request, tmp_path):
    """(method, trained model, its file path, its logits)."""
    model = METHODS[request.param]()
    path = tmp_path / f"{request.param}.safetensors"
    save_adapters(model, path)
    return request.param, model, path, out(model)


def assert_refused(path, match=None, model=None):
    return load_refused(fresh_base() if model is None else model, path, match)


# -- 1b: the checksum covers the config -------------------------------------------------

@pytest.mark.parametrize("field, old, new", [
    ("alpha", rb'\"alpha\": 3.0', rb'\"alpha\": 7.0'),        # '3' -> '7': one bit
    ("dropout", rb'\"dropout\": 0.0', rb'\"dropout\": 0.4'),  # '0' -> '4': one bit
    ("rank", rb'\"rank\": 2', rb'\"rank\": 3'),               # '2' -> '3': one bit
])
def test_one_flipped_digit_in_the_config_is_detected(tmp_path, field, old, new):
    model = krona_model()
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    data = path.read_bytes()
    assert data.count(old) == 6  # every adapter layer's entry (3 names x 2 blocks)
    bits = [bin(a ^ b).count("1") for a, b in zip(old, new)]
    assert sum(bits) == 1, field
    path.write_bytes(data.replace(old, new, 1))
    assert_refused(path, match="does not match its checksum")


def test_checksum_covers_s2ft_plan_and_mode(tmp_path):
    path = tmp_path / "s.safetensors"
    save_adapters(s2ft_model(), path)
    data = path.read_bytes()
    for old, new in [(rb'\"seed\": 1', rb'\"seed\": 3'),                   # no effect, still
                     (rb'\"mode\": \"adapter\"', rb'\"mode\": \"adaptes\"')]:  # refused
        assert old in data
        path.write_bytes(data.replace(old, new, 1))
        assert_refused(path, match="does not match its checksum")


def _rewrite_header(path, change) -> None:
    """Apply ``change`` to the safetensors header's JSON (tensor entries: dtype, shape,
    data_offsets) and write the file back; the tensor bytes and the kronops config stay."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def _retype(header):  # fp32 -> int32: the same bytes read as other values
    key = next(k for k, v in sorted(header.items()) if k != "__metadata__" and
               v["dtype"] == "F32" and len(v["shape"]) == 2)
    header[key]["dtype"] = "I32"


def _reshape(header):  # (a, b) -> (b, a): the same bytes in another layout
    key = next(k for k, v in sorted(header.items()) if k != "__metadata__" and
               len(v["shape"]) == 2 and v["shape"][0] != v["shape"][1])
    header[key]["shape"] = header[key]["shape"][::-1]


def _rename(header):  # the last tensor (in name order) renamed, still the last
    key = max(k for k in header if k != "__metadata__")
    header[key + "_"] = header.pop(key)


@pytest.mark.parametrize("change", [_retype, _reshape, _rename])
def test_a_tensor_dtype_shape_or_name_changed_alone_fails_the_checksum(saved, tmp_path, change):
    """Exactly one thing of one tensor changed in the safetensors header (its dtype, its
    shape, or its name), the bytes and the config as saved: the checksum catches it (it
    covers each tensor's name, dtype and shape, not only its bytes)."""
    _, _, path, _ = saved
    _rewrite_header(path, change)
    assert_refused(path, match="does not match its checksum")


def test_checksum_changes_with_a_tensor_dtype_shape_or_name_alone():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    config = dict(format="kronops-adapters")
    digest = checksum(config, {"x": t})
    for other in ({"x": t.view(torch.int32)}, {"x": t.reshape(4, 3)}, {"y": t}):
        assert checksum(config, other) != digest, other


# -- 1c: malformed configs with a valid checksum -----------------------------------------

def _paths(config, prefix=()):
    """Every (path of keys/indices) into the config's JSON tree, sha256 excluded."""
    for key, value in (config.items() if isinstance(config, dict) else enumerate(config)):
        if prefix == () and key == "sha256":
            continue
        here = prefix + (key,)
        yield here
        if isinstance(value, (dict, list)):
            yield from _paths(value, here)


def _at(config, path):
    for key in path:
        config = config[key]
    return config


def test_every_lost_key_is_refused_by_name(saved, tmp_path):
    method, _, path, _ = saved
    tensors, config = raw_read(path)
    keys = [p for p in _paths(config) if isinstance(_at(config, p[:-1]) if p[:-1] else config,
                                                   dict)]
    # tensor list entries are names of tensors: dropping one is a list mismatch, tested below
    keys = [p for p in keys if p[0] != "tensors" or len(p) == 1]
    assert len(keys) > 20
    target = tmp_path / "broken.safetensors"
    model = fresh_base()
    for key in keys:
        broken = copy.deepcopy(config)
        del _at(broken, key[:-1])[key[-1]]
        write_file(target, tensors, broken)
        message = assert_refused(target, model=model)
        if key[-1] not in ("format", "format_version", "method") and \
                not (len(key) == 2 and key[0] == "layers") and \
                not (len(key) == 3 and key[:2] == ("plan", "blocks")):
            assert repr(key[-1]) in message, (key, message)  # names the missing key


def _corrupt(name: str, rng) -> str:
    while True:
        i = rng.randrange(len(name))
        bad = name[:i] + rng.choice(["", "x", ".", "\x00", "é", "..", " ", "_"]) + name[i + 1:]
        if bad != name:
            return bad


def test_corrupted_names_are_refused(saved, tmp_path):
    """A tensor name, or a module name in the config (with its tensors renamed to match),
    corrupted at a random character: refused, the model untouched."""
    method, _, path, _ = saved
    tensors, config = raw_read(path)
    target = tmp_path / "broken.safetensors"
    model = fresh_base()
    rng = random.Random(5)
    for name in sorted(tensors):  # the tensor list follows; the layers/plan do not
        renamed = {(_corrupt(k, rng) if k == name else k): v for k, v in tensors.items()}
        write_file(target, renamed, config)
        assert_refused(target, model=model)
    modules = list(config["layers"]) if method == "krona" else list(config["plan"]["blocks"])
    for name in modules + config["train_modules"]:
        for _ in range(8):
            bad = _corrupt(name, rng)
            broken = copy.deepcopy(config)
            for key in ("layers",) if method == "krona" else ():
                broken[key] = {(bad if k == name else k): v for k, v in broken[key].items()}
            if method == "s2ft":
                blocks = broken["plan"]["blocks"]
                broken["plan"]["blocks"] = {(bad if k == name else k): v
                                            for k, v in blocks.items()}
            broken["train_modules"] = [bad if n == name else n for n in broken["train_modules"]]
            renamed = {(bad + k[len(name):] if k.startswith(name + ".") else k): v
                       for k, v in tensors.items()}
            write_file(target, renamed, broken)
            assert_refused(target, model=model)


def test_plan_from_json_refuses_malformed_plans():
    plan = select(tiny_llama(), heads=2, channels=3, seed=1)
    assert Plan.from_json(plan.to_json()) == plan
    data = json.loads(plan.to_json())
    for key in ("strategy", "seed", "blocks"):
        broken = {k: v for k, v in data.items() if k != key}
        with pytest.raises(AdapterFileError, match=f"missing key.*'{key}'"):
            Plan.from_json(json.dumps(broken))
    for key in ("heads", "channels", "num_heads", "num_kv_heads", "head_dim", "num_channels"):
        broken = copy.deepcopy(data)
        del broken["blocks"]["model.layers.1"][key]
        with pytest.raises(AdapterFileError, match=f"model.layers.1.*missing key.*'{key}'"):
            Plan.from_json(json.dumps(broken))
    for value, match in [([3, 1], "sorted"), ([1, 6], r"in \[0, 6\)"), ([True], "list of ints"),
                         ("1", "list of ints")]:
        broken = copy.deepcopy(data)
        broken["blocks"]["model.layers.0"]["heads"] = value
        with pytest.raises(AdapterFileError, match=match):
            Plan.from_json(json.dumps(broken))
    for text in ["", "{", "[]", "null", json.dumps({**data, "extra": 1})]:
        with pytest.raises(AdapterFileError):
            Plan.from_json(text)
    assert issubclass(AdapterFileError, ValueError)


_WRONG = {dict: [[], "x", None, 1], list: [{}, "x", None, 2.5], str: [1, None, [], {}],
          bool: ["x", None, []], int: ["x", None, [], {}, True, 1.5], float: ["x", None, [],
                                                                            True, float("nan")],
          type(None): ["x", [], {}]}


def _mutate(config, rng):
    """A copy of ``config`` made malformed at one random place: a key dropped or renamed,
    a value of the wrong kind, a list element dropped or doubled."""
    broken = copy.deepcopy(config)
    path = rng.choice(list(_paths(broken)))
    parent = _at(broken, path[:-1])
    key, value = path[-1], _at(broken, path)
    kinds = ["wrong type"] + (["drop", "rename"] if isinstance(parent, dict) else
                              ["drop element", "double element"])
    kind = rng.choice(kinds)
    if kind == "wrong type":
        parent[key] = rng.choice(_WRONG[type(value)])
    elif kind == "drop":
        del parent[key]
    elif kind == "rename":
        parent[key + rng.choice(["_", "s", "X"])] = parent.pop(key)
    elif kind == "drop element":
        del parent[key]
    else:
        parent.insert(key, parent[key])
    return broken


def test_structured_fuzz_of_the_config(saved, tmp_path):
    """300 malformed configs per method, each re-signed with a valid checksum: each load
    raises AdapterFileError with the model untouched, or (a change that affects nothing)
    loads outputs identical to the original."""
    method, _, path, expected = saved
    tensors, config = raw_read(path)
    rng = random.Random(1234)
    target = tmp_path / "fuzz.safetensors"
    def write(case):
        broken = _mutate(config, rng)
        try:
            write_file(target, tensors, broken, list_tensors=False)
        except ValueError:  # NaN: not JSON the checksum can cover; write it unsigned
            write_file(target, tensors, broken, sign=False)

    assert _loads_of_damaged_files(map(write, range(300)), target, expected) < 30


def _loads_of_damaged_files(writes, target, expected) -> int:
    """Load ``target`` into a fresh base after each of ``writes`` (an iterable that damages it
    anew per step): each load raises AdapterFileError with the model untouched, or loads
    outputs identical to the original. Returns how many loaded."""
    model, loaded = fresh_base(), 0
    before = snapshot(model)
    for case, _ in enumerate(writes):
        try:
            load_adapters(model, target)
        except AdapterFileError:
            assert_untouched(model, before)
            continue
        loaded += 1
        assert torch.equal(out(model), expected), case
        model = fresh_base()
        before = snapshot(model)
    return loaded


# -- 1c: random bit flips and truncations of real files -----------------------------------

def test_bit_flips_and_truncations_of_a_real_file(saved, tmp_path):
    """300 single-bit flips anywhere in the file and 40 truncations: each load raises
    AdapterFileError with the model untouched, or loads outputs identical to the original."""
    method, _, path, expected = saved
    data = path.read_bytes()
    rng = random.Random(4321)
    target = tmp_path / "flipped.safetensors"
    damaged = [bytes(data[:i]) + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
               for i in (rng.randrange(len(data)) for _ in range(300))]
    damaged += [data[:rng.randrange(len(data))] for _ in range(40)]
    assert _loads_of_damaged_files(map(target.write_bytes, damaged), target, expected) < 10


# -- 1d: exact shapes -------------------------------------------------------------------

@pytest.mark.parametrize("into", ["plain model", "adapted model"])
def test_a_transposed_tensor_with_a_valid_checksum_is_refused(saved, tmp_path, into):
    method, _, path, _ = saved
    tensors, config = raw_read(path)
    key = next(k for k, t in sorted(tensors.items()) if t.dim() == 2 and
               t.shape[0] != t.shape[1] and k.endswith((".b", ".delta")))
    transposed = dict(tensors, **{key: tensors[key].t().contiguous()})
    target = tmp_path / "transposed.safetensors"
    write_file(target, transposed, config)
    read_adapters(target)  # a well-formed file: checksum and tensor list fit
    model = fresh_base()
    if into == "adapted model":
        if method == "krona":
            apply_adapters(model, rank=2, alpha=3,
                           target_modules=["q_proj", "k_proj", "down_proj"])
        else:
            apply_adapters(model, "s2ft", plan=Plan.from_dict(config["plan"]),
                           train_modules=["lm_head"])
    shape = tuple(tensors[key].shape)
    assert_refused(target, model=model,
                   match=re.escape(f"{key} has values of shape {shape[::-1]} in the file, "
                                   f"{shape} in the model"))


def test_transposed_train_module_weight_is_refused(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert()
    apply_adapters(model, train_modules=["classifier"])
    path = tmp_path / "bert.safetensors"
    save_adapters(model, path)
    tensors, config = raw_read(path)
    tensors["classifier.weight"] = tensors["classifier.weight"].t().contiguous()
    write_file(path, tensors, config)
    torch.manual_seed(0)
    assert_refused(path, model=tiny_bert(), match=r"classifier.weight has values of shape")


# -- 3: saving: temporary files, the umask, the user's path -------------------------------

def _temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(TMP_SUFFIX))


def test_kill_mid_save_leaves_at_most_a_temporary_that_the_next_save_removes(tmp_path):
    model = krona_model()
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    previous = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{os.path.dirname(__file__)!r}, {os.path.dirname(os.path.dirname(__file__))!r}]
        from test_adapters_files import krona_model
        from kronops.adapters import save_adapters
        model = krona_model()
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        save_adapters(model, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == previous
    left = _temporaries(tmp_path)
    assert len(left) <= 1 and all(n.startswith(".adapters.safetensors.") for n in left)
    assert sorted(os.listdir(tmp_path)) == sorted(["adapters.safetensors"] + left)
    save_adapters(model, path)  # the writer is dead: its temporary goes
    assert os.listdir(tmp_path) == ["adapters.safetensors"]


def test_stale_temporaries_are_swept_and_live_ones_kept(tmp_path):
    model = krona_model()
    path = tmp_path / "a.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # a running process (pytest's parent)
    names = {
        "dead writer": f".a.safetensors.{host_name()}.{dead.pid}.{'0' * 16}{TMP_SUFFIX}",
        "live writer": f".a.safetensors.{host_name()}.{live}.{'1' * 16}{TMP_SUFFIX}",
        "old live writer": f".a.safetensors.{host_name()}.{live}.{'2' * 16}{TMP_SUFFIX}",
        "other host, recent": f".a.safetensors.elsewhere.{dead.pid}.{'3' * 16}{TMP_SUFFIX}",
        "other host, old": f".a.safetensors.elsewhere.{dead.pid}.{'4' * 16}{TMP_SUFFIX}",
        "other target": f".b.safetensors.{host_name()}.{dead.pid}.{'5' * 16}{TMP_SUFFIX}",
        "not ours": f".a.safetensors.{host_name()}.{dead.pid}.notours{TMP_SUFFIX}",
    }
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if "old" in what:
            hour_ago = time.time() - 3600
            os.utime(tmp_path / name, (hour_ago, hour_ago))
    save_adapters(model, path)
    kept = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"live writer", "other host, recent", "other target", "not ours"}


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_file_mode_follows_the_umask(tmp_path, umask):
    model = krona_model()
    previous = os.umask(umask)
    try:
        save_adapters(model, tmp_path / "a.safetensors")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode)
    assert mode == 0o666 & ~umask, oct(mode)


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_every_failure_removes_the_temporary(tmp_path, monkeypatch, failing):
    model = krona_model()
    path = tmp_path / "a.safetensors"

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    if failing == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FailingFile(fd))
    else:
        monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match=re.escape(f"cannot save adapters to {str(path)!r}: No "
                                                "space left on device")) as info:
        save_adapters(model, path)
    assert TMP_SUFFIX not in str(info.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


class _FailingFile:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_saving_to_a_missing_directory_or_onto_a_directory_names_the_path(tmp_path):
    model = krona_model()
    missing = tmp_path / "no_such_dir" / "a.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"cannot save adapters to {str(missing)!r}: directory "
            f"{str(tmp_path / 'no_such_dir')!r} does not exist")) as info:
        save_adapters(model, missing)
    assert TMP_SUFFIX not in str(info.value) and ".tmp" not in str(info.value)
    with pytest.raises(IsADirectoryError, match=re.escape(
            f"cannot save adapters to {str(tmp_path)!r}: it is a directory")) as info:
        save_adapters(model, tmp_path)
    assert ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        save_adapters(model, 3)
