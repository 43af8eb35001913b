"""Adapter files: ``save_adapters(model, path)`` / ``load_adapters(model, path)``.

One safetensors file: the adapter tensors (KronA factors, or S²FT indices and Δ, plus the
parameters of any ``train_modules``) and, in the header metadata under "kronops", a JSON
config: format version, kronops version, method, per-layer shapes and settings (KronA) or
the selection plan (S²FT), the train modules, and a SHA-256 of the tensor bytes.

Saving is atomic: the file is written to a temporary name in the same directory, flushed
to disk and moved over ``path`` with ``os.replace``, so a crash mid-save leaves any
previous file intact. Loading checks everything (file integrity, checksum, module names,
shapes, config) before it changes the model: on any error it raises ``ValueError`` naming
the problem and the model is untouched. A plain model (no adapters) gets the saved
adapters applied; a model with adapters already applied must have exactly the saved ones.
"""
import hashlib
import json
import os
import struct
import tempfile

import torch
from torch import nn

from .integration import STATE, adapter_modules, freeze_except, summarize, wrap_krona
from .kron_modules import KronALinear

FORMAT = "kronops-adapters"
FORMAT_VERSION = 1
KIND_KRONA, KIND_LOKR = "krona", "lokr"


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded into this model (the model is left untouched)."""


def _expect_linear(path, kind, name, module, linear, cfg) -> None:
    """``linear`` (the model's module ``name``, or its base) is an nn.Linear of the saved size."""
    if not isinstance(linear, nn.Linear):
        what = "missing" if module is None else f"a {type(module).__name__}"
        raise AdapterFileError(f"{path!r}: {kind} module {name!r} is {what} in the model, "
                               "expected an nn.Linear")
    if (linear.in_features, linear.out_features) != (cfg["in_features"], cfg["out_features"]):
        raise AdapterFileError(
            f"{path!r}: {name} is {linear.in_features}->{linear.out_features} in the model, "
            f"{cfg['in_features']}->{cfg['out_features']} in the file")


def _lokr_cls():
    from .peft_interop import LoKrLinear
    return LoKrLinear


def layer_config(layer: KronALinear) -> dict:
    """A KronA layer's constructor settings (JSON-serialisable)."""
    a1, a2 = layer.factor_a().shape
    cfg = dict(kind=KIND_KRONA, in_features=layer.in_features, out_features=layer.out_features,
               a_shape=[a1, a2], rank=layer.rank, alpha=layer.alpha,
               dropout=float(getattr(layer.dropout, "p", 0.0)))
    if isinstance(layer, _lokr_cls()):
        cfg.update(kind=KIND_LOKR, rank_b=layer.rank_b)
    return cfg


def build_layer(base: nn.Linear, cfg: dict) -> KronALinear:
    """The KronA layer ``cfg`` describes, over ``base``."""
    kw = dict(a_shape=tuple(cfg["a_shape"]), rank=cfg["rank"], alpha=cfg["alpha"],
              dropout=cfg["dropout"])
    if cfg["kind"] == KIND_LOKR:
        return _lokr_cls()(base, rank_b=cfg["rank_b"], **kw)
    if cfg["kind"] != KIND_KRONA:
        raise ValueError(f"unknown layer kind {cfg['kind']!r}")
    return KronALinear(base, **kw)


def _adapter_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in layer.named_parameters() if not n.startswith("base.")}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded FSDP2 parameter (DTensor) gathered whole (a collective), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _collect(model: nn.Module) -> tuple[dict, dict]:
    """(tensors, config) describing the model's adapters."""
    state = getattr(model, STATE, None)
    if state is None:
        raise ValueError("model has no kronops adapters: apply_adapters (or from_peft) first")
    import kronops
    method, tensors = state["method"], {}
    config = dict(format=FORMAT, format_version=FORMAT_VERSION, kronops_version=kronops.__version__,
                  method=method, train_modules=list(state["train_modules"]))
    if method == "krona":
        layers = {n: m for n, m in adapter_modules(model).items() if isinstance(m, KronALinear)}
        config["layers"] = {n: layer_config(m) for n, m in layers.items()}
        for name, layer in layers.items():
            for pname, p in _adapter_params(layer).items():
                tensors[f"{name}.{pname}"] = p
    else:
        from . import s2ft
        from .sparse_modules import S2FTInPlaceLinear
        layers = adapter_modules(model)
        if any(isinstance(m, S2FTInPlaceLinear) for m in layers.values()):
            raise ValueError("save_adapters stores S²FT adapter mode; in-place mode trains the "
                             "weights themselves (use kronops.s2ft.export)")
        if getattr(model, "_s2ft", None) is not None:  # LLaMA-style, maybe co-permuted
            config["plan"] = json.loads(model._s2ft["plan"].to_json())
            tensors.update(s2ft.export(model))
        else:  # BERT-style encoder layers: indices and Δ as they are
            config["s2ft_layers"] = {n: dict(side=m.mode, in_features=m.in_features,
                                             out_features=m.out_features)
                                     for n, m in layers.items()}
            config["encoder_plan"] = state.get("encoder_plan")
            for name, m in layers.items():
                if m.merged:
                    raise RuntimeError(f"{name} is merged: unmerge_adapters(model) before saving")
                tensors[f"{name}.{m.mode}"] = m.indices()
                tensors[f"{name}.delta"] = m.delta
    modules = dict(model.named_modules())
    for name in state["train_modules"]:
        for pname, p in modules[name].named_parameters():
            tensors[f"{name}.{pname}"] = p
    tensors = {k: _full(t).detach().to("cpu").contiguous() for k, t in tensors.items()}
    config["tensors"] = {k: dict(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""))
                         for k, t in tensors.items()}
    config["sha256"] = _digest(tensors)
    return tensors, config


def save_adapters(model: nn.Module, path) -> None:
    """Write the model's adapters to ``path`` (one safetensors file), atomically.

    Under torch.distributed every rank must call it (FSDP2 shards are gathered, a
    collective); only rank 0 writes.
    """
    from safetensors.torch import save
    tensors, config = _collect(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0:
        return
    data = save(tensors, metadata={"kronops": json.dumps(config, sort_keys=True)})
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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


def read_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from an adapter file, checked for integrity; AdapterFileError if not."""
    from safetensors.torch import load
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AdapterFileError(f"cannot read adapter file {path!r}: {e}") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as e:  # struct.error, JSON errors, SafetensorError
        raise AdapterFileError(f"{path!r} is not a valid adapter file (truncated or corrupt): "
                               f"{type(e).__name__}: {e}") from None
    try:
        config = json.loads(header["__metadata__"]["kronops"])
    except Exception:
        raise AdapterFileError(f"{path!r} is a safetensors file without a kronops adapter "
                               "config") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path!r}: unsupported format {config.get('format')!r} version "
                               f"{config.get('format_version')!r} (this kronops reads "
                               f"{FORMAT!r} version {FORMAT_VERSION})")
    if _digest(tensors) != config.get("sha256"):
        raise AdapterFileError(f"{path!r}: tensor data does not match its checksum (corrupt)")
    return tensors, config


def _check_tensors(tensors: dict, expected: dict[str, torch.Size], path: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{path!r} does not fit the model: tensors missing from the file "
                               f"{missing[:4]}{'...' if len(missing) > 4 else ''}, not in the "
                               f"model {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(f"{path!r}: {key} has shape {tuple(tensors[key].shape)} in "
                                   f"the file, {tuple(shape)} in the model")


def _krona_plan(model: nn.Module, config: dict, path: str):
    """Validate a KronA file against ``model``; returns (new layers to wrap or None, expected)."""
    modules = dict(model.named_modules())
    layers, existing = config["layers"], adapter_modules(model)
    expected = {}
    if existing:
        if set(existing) != set(layers):
            raise AdapterFileError(f"{path!r}: the model's adapters {sorted(existing)[:3]}... "
                                   f"differ from the file's {sorted(layers)[:3]}...")
        for name, cfg in layers.items():
            layer = existing[name]
            if not isinstance(layer, KronALinear):
                raise AdapterFileError(f"{path!r}: {name} is a {type(layer).__name__}, the file "
                                       f"holds a KronA layer")
            have = layer_config(layer)
            for key in ("kind", "in_features", "out_features", "a_shape", "rank", "alpha"):
                if have[key] != cfg.get(key):
                    raise AdapterFileError(f"{path!r}: {name} has {key} {have[key]!r} in the "
                                           f"model, {cfg.get(key)!r} in the file")
            expected.update({f"{name}.{n}": p.shape for n, p in _adapter_params(layer).items()})
        return None, expected
    for name, cfg in layers.items():
        module = modules.get(name)
        _expect_linear(path, "adapter", name, module, module, cfg)
        try:  # the exact parameter shapes, from a layer over a weightless stand-in
            probe = build_layer(nn.Linear(module.in_features, module.out_features, bias=False,
                                          device="meta"), cfg)
        except (TypeError, ValueError, KeyError) as e:
            raise AdapterFileError(f"{path!r}: bad config for {name}: {e}") from None
        expected.update({f"{name}.{n}": p.shape for n, p in _adapter_params(probe).items()})
    return layers, expected


def _s2ft_expected(model: nn.Module, config: dict, path: str):
    """Validate an S²FT file; returns (plan to apply or None, expected shapes, index checks)."""
    from . import s2ft
    from .s2ft.apply import check_plan
    from .s2ft.blocks import ATTENTION, head_rows, kv_heads
    plan = s2ft.Plan(config["plan"]["strategy"], config["plan"]["seed"], config["plan"]["blocks"])
    existing = adapter_modules(model)
    if existing and getattr(model, "_s2ft", {}).get("permutations"):
        raise AdapterFileError("the model's S²FT layers are co-permuted: kronops.s2ft.unpermute "
                               "it first, or load into a fresh model")
    try:
        blocks = s2ft.find_blocks(model)
        check_plan(plan, blocks)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path!r}: the selection plan does not fit the model: {e}") \
            from None
    modules = dict(model.named_modules())
    group_rows = {}
    for b in blocks:  # the rows/cols apply() selects (see kronops.s2ft.apply), original layout
        if b.name not in plan.blocks:
            continue
        heads, channels = plan.blocks[b.name]["heads"], plan.blocks[b.name]["channels"]
        q = head_rows(heads, b.head_dim).tolist()
        kv = head_rows(kv_heads(heads, b.num_heads, b.num_kv_heads), b.head_dim).tolist()
        parts = {"q_proj": ("rows", q), "k_proj": ("rows", kv), "v_proj": ("rows", kv),
                 "o_proj": ("cols", q), "gate_proj": ("rows", channels),
                 "up_proj": ("rows", channels), "down_proj": ("cols", channels)}
        for proj, (side, idx) in parts.items():
            if idx:
                group_rows[f"{b.attention if proj in ATTENTION else b.mlp}.{proj}"] = (side, idx)
    if existing and set(existing) != set(group_rows):
        raise AdapterFileError(f"{path!r}: the model's S²FT layers differ from the file's plan")
    expected, indices = {}, {}
    for name, (side, idx) in group_rows.items():
        module = modules[name]
        w = (module.base if hasattr(module, "base") else module).weight
        expected[f"{name}.{side}"] = torch.Size([len(idx)])
        expected[f"{name}.delta"] = torch.Size([len(idx), w.shape[1]] if side == "rows"
                                               else [w.shape[0], len(idx)])
        indices[f"{name}.{side}"] = idx
        if existing and existing[name].indices().tolist() != idx:
            raise AdapterFileError(f"{path!r}: {name} selects other {side} than the file")
    return (None if existing else plan), expected, indices


def _s2ft_layers_expected(model: nn.Module, config: dict, tensors: dict, path: str):
    """Validate per-layer S²FT tensors (no plan: BERT-style); (layers to wrap, shapes, indices)."""
    from .sparse_modules import S2FTLinear
    layers, existing = config["s2ft_layers"], adapter_modules(model)
    modules = dict(model.named_modules())
    if existing and set(existing) != set(layers):
        raise AdapterFileError(f"{path!r}: the model's S²FT layers differ from the file's")
    expected, indices, wraps = {}, {}, {}
    for name, cfg in layers.items():
        side = cfg.get("side")
        if side not in ("rows", "cols"):
            raise AdapterFileError(f"{path!r}: {name} has side {side!r}, expected rows or cols")
        module = existing.get(name) if existing else modules.get(name)
        base = module.base if isinstance(module, S2FTLinear) else module
        _expect_linear(path, "S²FT", name, module, base, cfg)
        key = f"{name}.{side}"
        index = tensors.get(key)
        size = base.in_features if side == "cols" else base.out_features
        if index is None or index.dtype != torch.int64 or index.dim() != 1 or \
                (index.numel() and (int(index.min()) < 0 or int(index.max()) >= size)) or \
                (index.numel() > 1 and not bool((index[1:] > index[:-1]).all())):
            raise AdapterFileError(f"{path!r}: {key} must be sorted unique int64 indices in "
                                   f"[0, {size})")
        if existing and (module.mode != side or not torch.equal(module.indices().cpu(), index)):
            raise AdapterFileError(f"{path!r}: {name} selects other {side} than the file")
        n = index.numel()
        expected[key] = torch.Size([n])
        expected[f"{name}.delta"] = torch.Size([n, base.in_features] if side == "rows"
                                               else [base.out_features, n])
        indices[key] = index.tolist()
        wraps[name] = (side, index)
    return (None if existing else wraps), expected, indices


def load_adapters(model: nn.Module, path, *, verbose: bool = False) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model`` (in place) and return it.

    A plain model gets the saved adapters applied (same module names and shapes needed); a
    model with adapters must hold exactly the saved layers. Any mismatch, a corrupt or
    truncated file: ``AdapterFileError`` (a ValueError) and the model is untouched.
    """
    path = os.fspath(path)
    tensors, config = read_adapters(path)
    method = config.get("method")
    state = getattr(model, STATE, None)
    if state is not None and state["method"] != method:
        raise AdapterFileError(f"{path!r} holds {method!r} adapters, the model has "
                               f"{state['method']!r} adapters")
    if state is None and adapter_modules(model):
        raise AdapterFileError("the model has adapter layers not set up by kronops.apply_adapters")
    merged = [n for n, m in adapter_modules(model).items() if getattr(m, "merged", False)]
    if merged:
        raise AdapterFileError(f"the model's adapters are merged (e.g. {merged[0]}): "
                               "unmerge_adapters(model) before loading")
    s2ft_wraps = None
    if method == "krona":
        new_layers, expected = _krona_plan(model, config, path)
        plan, index_values = None, {}
    elif method == "s2ft" and "plan" in config:
        plan, expected, index_values = _s2ft_expected(model, config, path)
        new_layers = None
    elif method == "s2ft":
        s2ft_wraps, expected, index_values = _s2ft_layers_expected(model, config, tensors, path)
        new_layers = plan = None
    else:
        raise AdapterFileError(f"{path!r}: unknown method {method!r}")
    modules = dict(model.named_modules())
    train = config.get("train_modules", [])
    if state is not None and list(state["train_modules"]) != list(train):
        raise AdapterFileError(f"{path!r}: train_modules {train} in the file, "
                               f"{state['train_modules']} in the model")
    for name in train:
        if name not in modules:
            raise AdapterFileError(f"{path!r}: train module {name!r} is not in the model")
        expected.update({f"{name}.{n}": p.shape for n, p in modules[name].named_parameters()})
    _check_tensors(tensors, expected, path)
    for key, idx in index_values.items():
        if tensors[key].dtype != torch.int64 or tensors[key].tolist() != idx:
            raise AdapterFileError(f"{path!r}: {key} differs from the selection plan")
    for key, t in tensors.items():
        if key not in index_values and not t.is_floating_point():
            raise AdapterFileError(f"{path!r}: {key} has dtype {t.dtype}, expected floating point")

    # Everything checked: now change the model.
    if new_layers is not None:
        wrap_krona(model, {n: dict(c) for n, c in new_layers.items() if c["kind"] == KIND_KRONA})
        for name, cfg in new_layers.items():
            if cfg["kind"] == KIND_LOKR:
                parent, _, leaf = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                setattr(owner, leaf, build_layer(modules[name], cfg))
    if plan is not None:
        from . import s2ft
        s2ft.apply(model, plan, mode="adapter")
    if s2ft_wraps is not None:
        from .sparse_modules import S2FTLinear
        for name, (side, index) in s2ft_wraps.items():
            base = modules[name]
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, S2FTLinear(base, **{side: index.to(base.weight.device)}))
    if state is None:
        layer_cfg = {n: dict(c) for n, c in config.get("layers", {}).items()}
        setattr(model, STATE, dict(method=method, layers=layer_cfg, train_modules=list(train)))
        if config.get("encoder_plan") is not None:
            getattr(model, STATE)["encoder_plan"] = config["encoder_plan"]
    params = {}
    for name, m in model.named_modules():
        params.update({f"{name}.{n}": p for n, p in m.named_parameters(recurse=False)})
    with torch.no_grad():
        for key, t in tensors.items():
            if key in index_values:
                continue
            params[key].copy_(t)
    freeze_except(model, list(train))
    if verbose:
        print(summarize(model))
    return model


__all__ = ["save_adapters", "load_adapters", "read_adapters", "AdapterFileError"]
