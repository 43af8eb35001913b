"""KronA^B and KronA^B_res in a model: a Kronecker adapter in parallel with each attention and
FFN sub-layer of a transformer, as the KronA paper applies them to T5.

A sub-layer F (attention, or FFN) maps its input x to an output that the block adds to its
residual stream (pre-LN models: x is the normalised hidden state; post-LN models like BERT:
before the sub-layer's LayerNorm). The adapter adds, in parallel with F,
  F(x) + s * x @ kron(A, B).T  (+ s_res * x with ``residual``, s_res learnable from 0)
``KronASublayer`` wraps F's last projection (attention output, FFN out: ``base``) and adds
the adapter to its output; x is the input of F's first projection (query or fused q/k/v,
first FFN-in: ``source``), taken by a forward pre-hook on that layer as F runs. B starts at
zero, so a fresh adapter changes nothing. F is not linear, so the adapter's update is not a
weight change: it cannot be merged into the model (``merge_adapters`` refuses).
"""
import torch
from torch import nn

from ..checks import check_features
from ..kron.modules import KronFactors, freeze
from ..wrapped_linear import WrapsLinear, check_linear, features

KIND_SUBLAYER = "krona_sublayer"
SUBLAYER_KEYS = ("kind", "source", "in_features", "out_features", "a_shape", "rank", "alpha",
                 "residual")


class _InputTap:
    """Forward pre-hook on the sub-layer's first projection: hands its input to ``adapter``.
    (An object, not a closure, so that deep-copying a model points the copy's hook at the
    copied adapter.)"""

    def __init__(self, adapter: "KronASublayer"):
        self.adapter = adapter

    def __call__(self, module, args):
        self.adapter._input = args[0] if args else None


class KronASublayer(WrapsLinear, KronFactors):
    """base(h) + s * x @ kron(A, B).T (+ s_res * x): KronA^B(_res) over one sub-layer whose
    last projection is ``base`` and whose input x reaches its first projection ``source``
    first (see the module docstring). x (..., in_features) with ``in_features`` that of
    ``source``; out_features that of base; factors as KronALinear's."""

    def __init__(self, base: nn.Module, source: nn.Module, *, residual: bool = False,
                 a_shape=None, rank: int | None = None, alpha: float | None = None):
        super().__init__()
        check_linear("base", base)
        check_linear("source", source)
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {residual!r}")
        in_features = features(source)[0]
        if residual and in_features != features(base)[1]:
            raise ValueError(f"residual needs the sub-layer's input and output sizes equal, got "
                             f"{in_features} and {features(base)[1]}")
        self.base = base
        freeze(base)
        w = self.base_weight
        self._init_factors(in_features, self.out_features, a_shape, rank, alpha, w.device,
                           w.dtype)
        self.adapter_in_features = in_features
        self.residual_scale = nn.Parameter(torch.zeros((), device=w.device, dtype=w.dtype)) \
            if residual else None
        self.merged = False
        self._input = None
        source.register_forward_pre_hook(_InputTap(self))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x, self._input = self._input, None
        if x is None:
            raise RuntimeError("KronASublayer: the sub-layer's first projection did not run "
                               "before its output projection in this forward pass (the "
                               "adapter's input comes from it)")
        check_features("sub-layer input", x, self.adapter_in_features)
        y = self.base(h)
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"sub-layer input of shape {tuple(x.shape)} does not match its "
                             f"output of shape {tuple(y.shape)} (leading dims differ)")
        y = y + self.adapter(x)
        if self.residual_scale is not None:
            y = y + self.residual_scale.to(x.dtype) * x
        return y

    def merge(self) -> None:
        raise RuntimeError("a KronA^B adapter runs in parallel with a non-linear sub-layer "
                           "(attention or FFN): its update is not a weight change and cannot "
                           "be merged")

    unmerge = merge

    def extra_repr(self) -> str:
        return f"{self._factor_repr()}, residual={self.residual_scale is not None}"


def sublayer_pairs(blocks) -> dict[str, str]:
    """{last projection: first projection} of every sub-layer of ``blocks``: the attention
    (output <- query or fused q/k/v) and the FFN (out <- first FFN-in) of each block."""
    pairs = {}
    for b in blocks:
        pairs[b.attention_output.module] = b.query.module
        if b.ffn_out is not None:
            pairs[b.ffn_out.module] = b.ffn_in[0].module
    return pairs


def sublayer_config(layer: KronASublayer, source: str) -> dict:
    """A KronASublayer's settings (JSON-serialisable), ``source`` its input layer's name."""
    a1, a2 = layer.factor_a().shape
    return dict(kind=KIND_SUBLAYER, source=source, in_features=layer.adapter_in_features,
                out_features=layer.out_features, a_shape=[a1, a2], rank=layer.rank,
                alpha=layer.alpha, residual=layer.residual_scale is not None)


def build_sublayer(base: nn.Module, source: nn.Module, cfg: dict) -> KronASublayer:
    """The KronASublayer ``cfg`` (a ``sublayer_config``) describes."""
    return KronASublayer(base, source, residual=cfg["residual"], a_shape=tuple(cfg["a_shape"]),
                         rank=cfg["rank"], alpha=cfg["alpha"])
