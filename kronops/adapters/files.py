"""Adapter files for every method: ``save_adapters(model, path)`` / ``load_adapters(model, path)``.

One safetensors file: the tensors, and in the header metadata under "kronops" a JSON config:
format, format_version (3), kronops_version, method, train_modules, tensors ({name: shape,
dtype}), base (below), sha256 (see below) and per method
  krona        layers: per adapter module its settings (``lokr.layer_config``)
  krona_block  layers: per sub-layer output module its settings, with the source module
               whose input the adapter takes (``sublayer.sublayer_config``)
  s2ft         plan (the ``Plan``, JSON) and mode ("adapter" | "inplace")
Tensors, by module name in the model:
  krona  ``<module>.a`` (or ``.a_u``, ``.a_v``), ``<module>.b`` (or ``.b_u``, ``.b_v``);
         krona_block also ``<module>.residual_scale`` with residual=True
  s2ft   ``<module>.rows`` or ``<module>.cols``: the sorted int64 indices the plan trains
         ``<module>.delta``   adapter mode: Δ, (|R|, in) or (out, |C|)
         ``<module>.weight``  in-place mode: those rows/columns of the trained weight
         all in the original layout (a co-permuted model is saved unpermuted)
  train modules: ``<module>.<parameter>``

The base model: ``base`` is the ``fingerprint`` of the base the adapters were trained on
(per adapted module: the weight's shape, dtype and a sample of its values; taken when the
adapters were applied; null when unknown). Loading into a base whose fingerprint differs
(another checkpoint of the same architecture) warns (``BaseMismatchWarning``), or raises
``AdapterFileError`` with ``strict=True``; the same base in another dtype is the same base.
Files of format version 2 (kronops before fingerprints) have no ``base`` and load with no
such check, also with ``strict=True``.

Integrity: ``sha256`` (``checksum``) covers every byte that affects results: the config
(every key but sha256 itself, as canonical JSON: sorted keys, no spaces, ASCII; the base
fingerprint included) and every tensor (name, dtype, shape, bytes), each length-prefixed. A
changed digit anywhere in the config or the data fails the check.

Saving is atomic: the file is written to a temporary file in the same directory
(``.<name>.<host>.<pid>.<random>.kronops-tmp``), flushed to disk and moved over ``path``
with ``os.replace``, so a crash mid-save leaves any previous file intact; on any error the
temporary file is removed. A process killed mid-save (SIGKILL) cannot clean up: the next
save to the same path removes such leftovers (those of a process that is no longer running
on this host, or older than ``STALE_TMP_S``). The file is created with the mode the umask
gives (0666 & ~umask), like any file a program creates. A missing directory, or ``path``
being a directory, raises before anything is written, naming ``path``.

Loading checks everything (file integrity, checksum, config structure, module names,
exact shapes, plan, base with ``strict=True``) before it changes the model: on any error it
raises ``AdapterFileError`` (a ValueError) naming the problem, and the model is untouched. A
plain model gets the saved adapters applied (S²FT: the plan in the saved mode, not
permuted), in the training mode of the Linears they wrap (a model in eval() mode stays
in eval mode); a model with adapters must hold exactly the saved ones (S²FT: the same plan
and mode, co-permuted or not).
"""
import errno
import hashlib
import json
import math
import os
import secrets
import socket
import struct
import time
import warnings

import torch
from torch import nn

from ..kron.modules import KronALinear
from ..s2ft.modules import S2FTInPlaceLinear, S2FTLinear
from ..version import __version__
from ..wrapped_linear import features, is_linear
from .apply import _check_overlap, freeze_except, plan_parts, summarize, wrap_krona, wrap_s2ft
from .blocks import find_blocks
from .errors import AdapterFileError, BaseMismatchWarning
from .fingerprint import check_fingerprint, differences, fingerprint
from .lokr import KIND_KRONA, KIND_LOKR, build_layer, layer_config
from .sublayer import (KIND_SUBLAYER, SUBLAYER_KEYS, KronASublayer, build_sublayer,
                       sublayer_config)
from .permutation import original_orders
from .selection import Plan, _expect_keys, _is_int, check_plan
from .state import METHODS, MODES, STATE, AdapterState, adapter_modules, adapter_state

FORMAT = "kronops-adapters"
FORMAT_VERSION = 3  # 2: one layout for every method (S²FT plan + mode); 3: + base fingerprint
READ_VERSIONS = (2, 3)
COMMON_KEYS = ("format", "format_version", "kronops_version", "method", "train_modules",
               "tensors", "sha256")
METHOD_KEYS = {"krona": ("layers",), "krona_block": ("layers",), "s2ft": ("plan", "mode")}
LAYER_KEYS = ("kind", "in_features", "out_features", "a_shape", "rank", "alpha", "dropout")
LAYER_KINDS = {"krona": (KIND_KRONA, KIND_LOKR), "krona_block": (KIND_SUBLAYER,)}
TMP_SUFFIX = ".kronops-tmp"
STALE_TMP_S = 15 * 60  # a temporary file this old is stale even if its pid is in use


def _expect_linear(path: str, name: str, module, cfg: dict) -> None:
    """The model's module ``name`` is a linear layer of the size the file's ``cfg`` gives."""
    if not is_linear(module):
        what = "missing" if module is None else f"a {type(module).__name__}"
        raise AdapterFileError(f"{path!r}: adapter module {name!r} is {what} in the model, "
                               "expected an nn.Linear (or transformers Conv1D)")
    in_features, out_features = features(module)
    if (in_features, out_features) != (cfg["in_features"], cfg["out_features"]):
        raise AdapterFileError(
            f"{path!r}: {name} is {in_features}->{out_features} in the model, "
            f"{cfg['in_features']}->{cfg['out_features']} in the file")


def adapter_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A KronA layer's own parameters (factors), by name within the layer."""
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _canonical(config: dict) -> bytes:
    """The config without its sha256, as canonical JSON bytes (sorted keys, no spaces,
    ASCII; NaN/Infinity refused)."""
    body = {k: v for k, v in config.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def checksum(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of an adapter file's content: the canonical config (every key but
    sha256) and, by sorted name, each tensor's name, dtype, shape and bytes, every field
    length-prefixed. ValueError/TypeError if the config is not plain finite JSON."""
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    field(b"kronops-adapters")
    field(_canonical(config))
    for key in sorted(tensors):
        t = tensors[key]
        field(key.encode("utf-8"))
        field(_dtype_name(t).encode())
        field(json.dumps(list(t.shape)).encode())
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data.tobytes() if not data.flags.c_contiguous else data)
    return h.hexdigest()


def _layer_config(layer: nn.Module, recorded: dict | None) -> dict:
    """A KronA-family layer's settings; a KronA^B layer's source from ``recorded`` (the
    state's entry: the layer itself does not know its source's name)."""
    if isinstance(layer, KronASublayer):
        return sublayer_config(layer, recorded["source"])
    return layer_config(layer)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded FSDP2 parameter (DTensor) gathered whole (a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _s2ft_layers(model: nn.Module) -> dict[str, S2FTLinear]:
    """The model's S²FT layers (both modes) by module name."""
    return {n: m for n, m in adapter_modules(model).items() if isinstance(m, S2FTLinear)}


def _to_original(layer: S2FTLinear, order) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's indices in the original layout, sorted; position): the file's values are
    the layer's (Δ, or weight part) at ``position`` along the selected dim. ``order``: the
    layer's co-permutation (new index -> original index), or None."""
    indices = layer.indices().cpu()
    if order is None:
        return indices, torch.arange(indices.numel())
    return order[indices].sort()


def _s2ft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per S²FT layer its indices and Δ (adapter) or trained weight part (in place), in the
    original layout (see the module docstring)."""
    orders = original_orders(model)
    out = {}
    for name, layer in _s2ft_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged: unmerge_adapters(model) before saving")
        dim = 1 if layer.mode == "cols" else 0
        indices, position = _to_original(layer, orders.get(name))
        if isinstance(layer, S2FTInPlaceLinear):
            key, values = "weight", _full(layer.base_weight).detach().index_select(
                dim, layer.indices())
        else:
            key, values = "delta", _full(layer.delta).detach()
        out[f"{name}.{layer.mode}"] = indices
        out[f"{name}.{key}"] = values.index_select(dim, position.to(values.device))
    return out


def _collect(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, config) describing the model's adapters."""
    state = adapter_state(model)
    if state is None:
        raise ValueError("model has no kronops adapters (no KronA or S²FT layers): "
                         "apply_adapters (or from_peft) first")
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, kronops_version=__version__,
                  method=state.method, train_modules=list(state.train_modules),
                  base=state.base)
    tensors = {}
    if state.method in LAYER_KINDS:
        layers = {n: m for n, m in adapter_modules(model).items()
                  if isinstance(m, (KronALinear, KronASublayer))}
        config["layers"] = {n: _layer_config(m, state.layers.get(n)) for n, m in layers.items()}
        for name, layer in layers.items():
            for pname, p in adapter_params(layer).items():
                tensors[f"{name}.{pname}"] = p
    else:
        config.update(plan=json.loads(state.plan.to_json()), mode=state.mode)
        tensors.update(_s2ft_tensors(model))
    for name in state.train_modules:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{name}.{pname}"] = p
    tensors = {k: _full(t).detach().to("cpu").contiguous() for k, t in tensors.items()}
    config["tensors"] = {k: dict(shape=list(t.shape), dtype=_dtype_name(t))
                         for k, t in tensors.items()}
    config["sha256"] = checksum(config, tensors)
    return tensors, config


def _host() -> str:
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _tmp_prefix(base: str) -> str:
    return f".{base}."


def _tmp_owner(base: str, entry: str):
    """(host, pid) of a temporary file ``entry`` that a save to ``base`` made, else None."""
    prefix = _tmp_prefix(base)
    if not (entry.startswith(prefix) and entry.endswith(TMP_SUFFIX)):
        return None
    parts = entry[len(prefix):-len(TMP_SUFFIX)].split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 16 or \
            any(c not in "0123456789abcdef" for c in parts[2]):
        return None
    return parts[0], int(parts[1])


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (assumed so where it cannot be told)."""
    if os.name != "posix":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


_WRITING: set[str] = set()  # temporary files this process is writing now


def _sweep(directory: str, base: str) -> None:
    """Remove stale temporary files of earlier saves to ``base`` in ``directory``: those of
    a process no longer running on this host, or older than STALE_TMP_S (a reused pid,
    another host). Errors are ignored (it is housekeeping)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    host, now = _host(), time.time()
    for entry in entries:
        owner = _tmp_owner(base, entry)
        full = os.path.join(directory, entry)
        if owner is None or full in _WRITING:
            continue
        try:
            age = now - os.lstat(full).st_mtime
            dead = owner[0] == host and (owner[1] == os.getpid() or not _pid_alive(owner[1]))
            if dead or age > STALE_TMP_S:
                os.remove(full)
        except OSError:
            pass


def _save_error(e: OSError, path: str) -> OSError:
    """The same kind of error, about the user's ``path`` (not the temporary file)."""
    reason = e.strerror if e.errno is not None and e.strerror else str(e)
    message = f"cannot save adapters to {path!r}: {reason}"
    try:
        return type(e)(e.errno, message) if e.errno is not None else type(e)(message)
    except TypeError:
        return OSError(message)


def _check_target(path: str) -> str:
    """The directory ``path`` goes into; a clear error naming ``path`` if it cannot be a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot save adapters to {path!r}: it is a "
                                "directory; give a file path, e.g. "
                                f"{os.path.join(path, 'adapters.safetensors')!r}")
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"cannot save adapters to {path!r}: directory "
                                f"{directory!r} {what} (create it first)")
    return directory


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring): temporary file,
    fsync, os.replace, fsync of the directory; the temporary file is removed on any error."""
    path = os.fspath(path)
    directory = _check_target(path)
    base = os.path.basename(path)
    _sweep(directory, base)
    while True:
        tmp = os.path.join(directory, f"{_tmp_prefix(base)}{_host()}.{os.getpid()}."
                                      f"{secrets.token_hex(8)}{TMP_SUFFIX}")
        _WRITING.add(tmp)  # before it exists: a concurrent sweep in this process skips it
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)  # the umask decides the mode, as for any new file
            break
        except FileExistsError:
            _WRITING.discard(tmp)
        except OSError as e:
            _WRITING.discard(tmp)
            raise _save_error(e, path) from e
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise _save_error(e, path) from e
    finally:
        _WRITING.discard(tmp)
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_adapters(model: nn.Module, path) -> None:
    """Write the model's adapters to ``path`` (one safetensors file), atomically.

    Under torch.distributed every rank must call it (FSDP2 shards are gathered, a
    collective); only rank 0 writes. See the module docstring for the format, the
    checksum, temporary files and errors.
    """
    from safetensors.torch import save
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    tensors, config = _collect(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0:
        return
    data = save(tensors, metadata={"kronops": json.dumps(config, sort_keys=True)})
    write_atomic(path, data)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _check_layer_config(name: str, cfg, method: str) -> None:
    """A KronA/LoKr (``lokr.layer_config``) or KronA^B (``sublayer.sublayer_config``) layer
    config of the right structure and values for ``method``."""
    where = f"layer {name!r}"
    kinds = LAYER_KINDS[method]
    if not isinstance(cfg, dict) or "kind" not in cfg:
        _expect_keys(where, cfg, LAYER_KEYS)  # names what is missing
    kind = cfg["kind"]
    if kind not in kinds:
        raise AdapterFileError(f"{where}: kind must be one of {kinds} for method {method!r}, "
                               f"got {kind!r}")
    _expect_keys(where, cfg, SUBLAYER_KEYS if kind == KIND_SUBLAYER else
                 LAYER_KEYS + (("rank_b",) if kind == KIND_LOKR else ()))
    if kind == KIND_SUBLAYER and (not isinstance(cfg["source"], str) or not cfg["source"]):
        raise AdapterFileError(f"{where}: source must be a module name, got {cfg['source']!r}")
    if kind == KIND_SUBLAYER and not isinstance(cfg["residual"], bool):
        raise AdapterFileError(f"{where}: residual must be true or false, "
                               f"got {cfg['residual']!r}")
    for key in ("in_features", "out_features") + (("rank_b",) if kind == KIND_LOKR else ()):
        if not _is_int(cfg[key]) or cfg[key] <= 0:
            raise AdapterFileError(f"{where}: {key} must be a positive int, got {cfg[key]!r}")
    a_shape = cfg["a_shape"]
    if not isinstance(a_shape, list) or len(a_shape) != 2 or \
            not all(_is_int(d) and d > 0 for d in a_shape) or \
            cfg["out_features"] % a_shape[0] or cfg["in_features"] % a_shape[1]:
        raise AdapterFileError(f"{where}: a_shape must be [a1, a2] dividing (out_features, "
                               f"in_features) = ({cfg['out_features']}, {cfg['in_features']}), "
                               f"got {a_shape!r}")
    rank = cfg["rank"]
    if rank is not None and (not _is_int(rank) or rank <= 0):
        raise AdapterFileError(f"{where}: rank must be null or a positive int, got {rank!r}")
    if not _is_number(cfg["alpha"]):
        raise AdapterFileError(f"{where}: alpha must be a finite number, got {cfg['alpha']!r}")
    if kind != KIND_SUBLAYER and (not _is_number(cfg["dropout"]) or
                                  not 0.0 <= cfg["dropout"] < 1.0):
        raise AdapterFileError(f"{where}: dropout must be a number in [0, 1), "
                               f"got {cfg['dropout']!r}")


def _check_config(config: dict, tensors: dict, path: str) -> None:
    """The config's structure: every key present, of its type, nothing unknown; the tensor
    list matching the file's tensors exactly. AdapterFileError naming what is wrong."""
    method = config.get("method")
    if method not in METHODS:
        raise AdapterFileError(f"{path!r}: unknown method {method!r} (expected one of "
                               f"{METHODS})")
    versioned = ("base",) if config["format_version"] >= 3 else ()
    try:
        _expect_keys("config", config, COMMON_KEYS + METHOD_KEYS[method] + versioned)
    except AdapterFileError as e:
        raise AdapterFileError(f"{path!r}: {e}") from None
    if not isinstance(config["kronops_version"], str):
        raise AdapterFileError(f"{path!r}: kronops_version must be a str, "
                               f"got {config['kronops_version']!r}")
    train = config["train_modules"]
    if not isinstance(train, list) or not all(isinstance(n, str) and n for n in train) or \
            len(set(train)) != len(train):
        raise AdapterFileError(f"{path!r}: train_modules must be a list of distinct module "
                               f"names, got {train!r}")
    listed = config["tensors"]
    if not isinstance(listed, dict) or set(listed) != set(tensors):
        raise AdapterFileError(f"{path!r}: the config's tensor list differs from the tensors "
                               "in the file")
    for key, t in tensors.items():
        if listed[key] != dict(shape=list(t.shape), dtype=_dtype_name(t)):
            raise AdapterFileError(f"{path!r}: {key} is listed as {listed[key]!r}, the file "
                                   f"holds shape {list(t.shape)} dtype {_dtype_name(t)}")
    try:
        check_fingerprint(config.get("base"))
        if method in LAYER_KINDS:
            layers = config["layers"]
            if not isinstance(layers, dict) or not layers:
                raise AdapterFileError(f"layers must be a non-empty dict, got {layers!r}")
            for name, cfg in layers.items():
                if not name:
                    raise AdapterFileError("layers names a module with an empty name")
                _check_layer_config(name, cfg, method)
        else:
            Plan.from_dict(config["plan"])
            if config["mode"] not in MODES:
                raise AdapterFileError(f"mode {config['mode']!r}, expected one of {MODES}")
    except AdapterFileError as e:
        raise AdapterFileError(f"{path!r}: {e}") from None


def read_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from an adapter file, checked for integrity (checksum over config
    and tensors) and structure; ``AdapterFileError`` naming the problem if not."""
    from safetensors.torch import load
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AdapterFileError(f"cannot read adapter file {path!r}: {e}") from e
    if len(data) >= 8 and data[8:9] != b"{":  # a safetensors header is a JSON object
        raise AdapterFileError(f"{path!r} is not a kronops adapter file (not safetensors: it "
                               f"starts with {data[:9]!r}, not an 8-byte length and a JSON "
                               "header); save_adapters writes them (torch.save does not)")
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n > len(data):
            raise ValueError(f"header of {n} bytes, file of {len(data)}")
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as e:  # struct.error, JSON errors, SafetensorError
        raise AdapterFileError(f"{path!r} is not a valid adapter file (truncated or corrupt): "
                               f"{type(e).__name__}: {e}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    text = metadata.get("kronops") if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise AdapterFileError(f"{path!r} is a safetensors file without a kronops adapter "
                               "config")
    try:
        config = json.loads(text)
    except ValueError as e:
        raise AdapterFileError(f"{path!r}: the kronops config is not valid JSON (corrupt): "
                               f"{e}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{path!r}: the kronops config is not a JSON object (corrupt)")
    if config.get("format") != FORMAT or config.get("format_version") not in READ_VERSIONS:
        raise AdapterFileError(f"{path!r}: unsupported format {config.get('format')!r} version "
                               f"{config.get('format_version')!r} (this kronops reads "
                               f"{FORMAT!r} versions {READ_VERSIONS})")
    try:
        digest = checksum(config, tensors)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: the kronops config is not plain JSON (corrupt): "
                               f"{e}") from None
    if digest != config.get("sha256"):
        raise AdapterFileError(f"{path!r}: config or tensor data does not match its checksum "
                               "(corrupt)")
    _check_config(config, tensors, path)
    return tensors, config


def _check_tensors(model: nn.Module, tensors: dict, expected: dict[str, torch.Size],
                   path: str) -> None:
    """The file holds exactly the ``expected`` tensors, of those shapes."""
    modules = dict(model.named_modules())
    for key in sorted(set(tensors) - set(expected)):
        layer = key.rpartition(".")[0]
        if layer not in modules:
            raise AdapterFileError(f"{path!r}: {key!r} does not fit the model: layer {layer!r} "
                                   "is not a module of the model")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path!r} does not fit the model: tensors missing from the file "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''}, not in the "
                               f"model {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(f"{path!r}: {key} has values of shape "
                                   f"{tuple(tensors[key].shape)} in the file, {tuple(shape)} in "
                                   "the model")


def _expect_sublayer(path: str, name: str, modules: dict, cfg: dict) -> None:
    """The model has the KronA^B layer's output module ``name`` and its source, linear
    layers of the file's sizes."""
    for role, layer_name, key, side in (("output", name, "out_features", 1),
                                        ("source", cfg["source"], "in_features", 0)):
        layer = modules.get(layer_name)
        if not is_linear(layer):
            what = "missing" if layer is None else f"a {type(layer).__name__}"
            raise AdapterFileError(f"{path!r}: sub-layer {role} module {layer_name!r} is {what} "
                                   "in the model, expected a linear layer")
        if features(layer)[side] != cfg[key]:
            raise AdapterFileError(f"{path!r}: {layer_name} has {key.replace('_', ' ')} "
                                   f"{features(layer)[side]} in the model, {cfg[key]} in the file")


def _probe(path: str, name: str, modules: dict, cfg: dict) -> nn.Module:
    """The layer ``cfg`` describes over weightless stand-ins of the model's layers (checked
    to exist with the file's sizes): its exact parameter shapes."""
    sublayer = cfg["kind"] == KIND_SUBLAYER
    if sublayer:
        _expect_sublayer(path, name, modules, cfg)
    else:
        _expect_linear(path, name, modules.get(name), cfg)
    try:
        if sublayer:
            return build_sublayer(nn.Linear(1, cfg["out_features"], bias=False, device="meta"),
                                  nn.Linear(cfg["in_features"], 1, bias=False, device="meta"), cfg)
        return build_layer(nn.Linear(cfg["in_features"], cfg["out_features"], bias=False,
                                     device="meta"), cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterFileError(f"{path!r}: bad config for {name}: {e}") from None


def _check_krona(model: nn.Module, config: dict, path: str):
    """Validate a KronA or KronA^B file against ``model``: (layers to wrap or None, expected
    shapes)."""
    modules = dict(model.named_modules())
    layers, existing = config["layers"], adapter_modules(model)
    state = adapter_state(model)
    expected = {}
    if existing:
        if set(existing) != set(layers):
            raise AdapterFileError(f"{path!r}: the model's adapters {sorted(existing)[:3]}... "
                                   f"differ from the file's {sorted(layers)[:3]}...")
        for name, cfg in layers.items():
            layer = existing[name]
            if not isinstance(layer, (KronALinear, KronASublayer)):
                raise AdapterFileError(f"{path!r}: {name} is a {type(layer).__name__}, the file "
                                       f"holds a KronA layer")
            have = _layer_config(layer, state.layers.get(name))
            for key in [k for k in have if k != "dropout"]:
                if have[key] != cfg.get(key):
                    raise AdapterFileError(f"{path!r}: {name} has {key} {have[key]!r} in the "
                                           f"model, {cfg.get(key)!r} in the file")
            expected.update({f"{name}.{n}": p.shape for n, p in adapter_params(layer).items()})
        return None, expected
    for name, cfg in layers.items():
        probe = _probe(path, name, modules, cfg)
        expected.update({f"{name}.{n}": p.shape for n, p in adapter_params(probe).items()})
    return layers, expected


def _check_s2ft(model: nn.Module, config: dict, path: str):
    """Validate an S²FT file against ``model``: (plan, mode, expected shapes, index tensors)."""
    try:
        plan = Plan.from_dict(config["plan"])
    except AdapterFileError as e:
        raise AdapterFileError(f"{path!r}: {e}") from None
    mode = config["mode"]
    if mode not in MODES:
        raise AdapterFileError(f"{path!r}: mode {mode!r}, expected one of {MODES}")
    try:
        blocks = find_blocks(model)
        check_plan(plan, blocks)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: the selection plan does not fit the model: {e}") \
            from None
    parts = plan_parts(blocks, plan)
    state = adapter_state(model)
    if state is not None:  # the same plan and mode, maybe co-permuted
        if state.mode != mode:
            raise AdapterFileError(f"{path!r} holds S²FT in {mode!r} mode, the model's S²FT "
                                   f"layers are in {state.mode!r} mode")
        layers = _s2ft_layers(model)
        if set(layers) != set(parts):
            raise AdapterFileError(f"{path!r}: the model's S²FT layers differ from the file's "
                                   "plan")
        orders = original_orders(model)
        for name, (side, indices) in parts.items():
            original, _ = _to_original(layers[name], orders.get(name))
            if layers[name].mode != side or not torch.equal(original, indices):
                raise AdapterFileError(f"{path!r}: {name} selects other {side} than the file")
    expected, index_tensors = {}, {}
    value = "delta" if mode == "adapter" else "weight"
    for name, (side, indices) in parts.items():
        in_features, out_features = features(model.get_submodule(name))
        expected[f"{name}.{side}"] = torch.Size([indices.numel()])
        expected[f"{name}.{value}"] = torch.Size(
            [indices.numel(), in_features] if side == "rows" else [out_features, indices.numel()])
        index_tensors[f"{name}.{side}"] = indices
    return plan, mode, expected, index_tensors


@torch.no_grad()
def _write_s2ft(model: nn.Module, tensors: dict) -> None:
    """Put the file's Δ (adapter) or trained rows/columns (in place) into the S²FT layers."""
    orders = original_orders(model)
    for name, layer in _s2ft_layers(model).items():
        _, position = _to_original(layer, orders.get(name))
        dim = 1 if layer.mode == "cols" else 0
        if isinstance(layer, S2FTInPlaceLinear):
            w = layer.base_weight
            w.index_copy_(dim, layer.indices()[position.to(w.device)],
                          tensors[f"{name}.weight"].to(w.device, w.dtype))
        else:
            delta = layer.delta
            delta.index_copy_(dim, position.to(delta.device),
                              tensors[f"{name}.delta"].to(delta.device, delta.dtype))


def prepare_load(model: nn.Module, tensors: dict, config: dict, path: str) -> dict:
    """Check a read file against ``model`` without changing it; what ``load_adapters``
    needs to apply it. AdapterFileError naming the first problem."""
    method = config["method"]
    state = adapter_state(model)
    if state is not None and state.method != method:
        raise AdapterFileError(f"{path!r} holds {method!r} adapters, the model has "
                               f"{state.method!r} adapters")
    if state is None and adapter_modules(model):
        raise AdapterFileError("the model has adapter layers not set up by kronops.apply_adapters")
    merged = [n for n, m in adapter_modules(model).items() if m.merged]
    if merged:
        raise AdapterFileError(f"the model's adapters are merged (e.g. {merged[0]}): "
                               "unmerge_adapters(model) before loading")
    plan = mode = new_layers = None
    index_tensors, s2ft_keys = {}, set()
    if method in LAYER_KINDS:
        new_layers, expected = _check_krona(model, config, path)
        adapted = list(config["layers"])
    else:
        plan, mode, expected, index_tensors = _check_s2ft(model, config, path)
        s2ft_keys = set(expected)
        adapted = list(plan_parts(find_blocks(model), plan))
    modules = dict(model.named_modules())
    train = list(config["train_modules"])
    if state is not None and list(state.train_modules) != train:
        raise AdapterFileError(f"{path!r}: train_modules {train} in the file, "
                               f"{state.train_modules} in the model")
    for name in train:
        if name not in modules:
            raise AdapterFileError(f"{path!r}: train module {name!r} is not in the model")
    try:
        _check_overlap(train, adapted)
    except ValueError as e:
        raise AdapterFileError(f"{path!r}: {e}") from None
    for name in train:
        expected.update({f"{name}.{n}": p.shape for n, p in modules[name].named_parameters()})
    _check_tensors(model, tensors, expected, path)
    for key, indices in index_tensors.items():
        if tensors[key].dtype != torch.int64 or not torch.equal(tensors[key], indices):
            raise AdapterFileError(f"{path!r}: {key} differs from the selection plan")
    for key, t in tensors.items():
        if key not in index_tensors and not t.is_floating_point():
            raise AdapterFileError(f"{path!r}: {key} has dtype {t.dtype}, expected floating point")
    base, base_mismatch = _compare_base(model, state, config.get("base"), adapted, path)
    return dict(method=method, state=state, plan=plan, mode=mode, new_layers=new_layers,
                train=train, s2ft_keys=s2ft_keys, base=base, base_mismatch=base_mismatch)


def _compare_base(model: nn.Module, state, saved: dict | None, adapted: list[str], path: str):
    """(the model's base fingerprint over the ``adapted`` modules: recorded in its state, or
    taken now from a plain model; a message when the file's ``saved`` one differs, or None)."""
    if saved is not None and set(saved) != set(adapted):
        raise AdapterFileError(
            f"{path!r}: the base fingerprint covers other modules than the adapters (missing "
            f"{sorted(set(adapted) - set(saved))[:3]}, not adapted "
            f"{sorted(set(saved) - set(adapted))[:3]})")
    current = fingerprint(model, adapted) if state is None else state.base
    if saved is None or current is None:
        return current, None
    found = differences(saved, current)
    if not found:
        return current, None
    return current, (f"{path!r} was saved from another base model: {len(found)} of "
                     f"{len(saved)} adapted module(s) differ, e.g. {'; '.join(found[:2])}")


def check_load(model: nn.Module, path: str, *, strict: bool = False) -> tuple[dict, dict, dict]:
    """(tensors, config, what ``prepare_load`` found) for the adapter file at ``path``, read
    and checked against ``model`` without changing it; AdapterFileError naming the problem
    (with ``strict``, also a file saved from another base model)."""
    tensors, config = read_adapters(path)
    try:
        todo = prepare_load(model, tensors, config, path)
        if strict and todo["base_mismatch"]:
            raise AdapterFileError(todo["base_mismatch"])
        return tensors, config, todo
    except AdapterFileError:
        raise
    except Exception as e:  # a file malformed in a way no check above names
        raise AdapterFileError(f"{path!r}: malformed adapter file ({type(e).__name__}: {e})") \
            from None


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
    path = os.fspath(path)
    tensors, config, todo = check_load(model, path, strict=strict)
    if todo["base_mismatch"]:
        warnings.warn(f"{todo['base_mismatch']}; load_adapters(..., strict=True) refuses such "
                      "a file", BaseMismatchWarning, stacklevel=2)
    method, state, train, s2ft_keys = todo["method"], todo["state"], todo["train"], \
        todo["s2ft_keys"]

    # Everything checked: now change the model.
    if state is None and method in LAYER_KINDS:
        wrap_krona(model, todo["new_layers"])
        setattr(model, STATE, AdapterState(method, list(train), base=todo["base"], layers={
            n: _layer_config(m, todo["new_layers"][n])
            for n, m in adapter_modules(model).items()}))
    elif state is None:
        deltas = [tensors[k].dtype for k in sorted(s2ft_keys) if k.endswith(".delta")]
        wrap_s2ft(model, find_blocks(model), todo["plan"], todo["mode"],
                  delta_dtype=deltas[0] if deltas else torch.float32)
        setattr(model, STATE, AdapterState(method, list(train), base=todo["base"],
                                           plan=todo["plan"], mode=todo["mode"]))
    params = {}
    for name, m in model.named_modules():
        params.update({f"{name}.{n}": p for n, p in m.named_parameters(recurse=False)})
    with torch.no_grad():
        for key, t in tensors.items():
            if key not in s2ft_keys:
                params[key].copy_(t)
    if method == "s2ft":
        _write_s2ft(model, tensors)
    freeze_except(model, list(train))
    if verbose:
        print(summarize(model))
    return model


__all__ = ["save_adapters", "load_adapters", "read_adapters", "checksum", "AdapterFileError"]
