"""The KronA-family layers model-level code builds, and their settings as JSON and back.

``LoKrLinear``: KronALinear with a rank-decomposed B (PEFT LoKr's decomposed w2).
``layer_config(layer)`` gives a KronALinear/LoKrLinear's constructor settings (what adapter
files and ``model._kronops.layers`` record); ``build_layer(base, config)`` rebuilds the layer.
"""
import math

import torch
from torch import nn

from ..kron.modules import KronALinear

KIND_KRONA, KIND_LOKR = "krona", "lokr"


class LoKrLinear(KronALinear):
    """KronALinear with a rank-decomposed B as well: B = B_u (b1, rank_b) @ B_v (rank_b, b2).

    y = base(x) + s * dropout(x) @ kron(A, B).T with A as in KronALinear (a full (a1, a2), or
    A_u @ A_v with ``rank``). This is PEFT LoKr with a decomposed w2; B_u starts at zero.
    """

    def __init__(self, base: nn.Linear, *, rank_b: int, a_shape=None, rank: int | None = None,
                 alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, a_shape=a_shape, rank=rank, alpha=alpha, dropout=dropout)
        if isinstance(rank_b, bool) or not isinstance(rank_b, int) or rank_b <= 0:
            raise ValueError(f"rank_b must be a positive int, got {rank_b!r}")
        b1, b2 = self.b.shape
        kw = dict(device=self.b.device, dtype=self.b.dtype)
        del self.b
        self.rank_b = rank_b
        self.b_u = nn.Parameter(torch.zeros(b1, rank_b, **kw))
        self.b_v = nn.Parameter(torch.empty(rank_b, b2, **kw))
        nn.init.kaiming_uniform_(self.b_v, a=math.sqrt(5))

    def factor_b(self) -> torch.Tensor:
        """B (b1, b2) = B_u @ B_v."""
        return self.b_u @ self.b_v

    def _factor_repr(self) -> str:
        a = f"a={tuple(self.a.shape)}" if self.rank is None else \
            f"a=({self.a_u.shape[0]}, {self.a_v.shape[1]}), rank={self.rank}"
        return f"{a}, b=({self.b_u.shape[0]}, {self.b_v.shape[1]}), rank_b={self.rank_b}, " \
               f"scale={self.scale:g}"


def layer_config(layer: KronALinear) -> dict:
    """A KronA layer's constructor settings (JSON-serialisable): kind ("krona" | "lokr"),
    in_features, out_features, a_shape [a1, a2], rank, alpha, dropout (and rank_b)."""
    a1, a2 = layer.factor_a().shape
    cfg = dict(kind=KIND_KRONA, in_features=layer.in_features, out_features=layer.out_features,
               a_shape=[a1, a2], rank=layer.rank, alpha=layer.alpha,
               dropout=float(getattr(layer.dropout, "p", 0.0)))
    if isinstance(layer, LoKrLinear):
        cfg.update(kind=KIND_LOKR, rank_b=layer.rank_b)
    return cfg


def build_layer(base: nn.Linear, cfg: dict) -> KronALinear:
    """The KronA layer ``cfg`` (a ``layer_config``) describes, over ``base``."""
    kw = dict(a_shape=tuple(cfg["a_shape"]), rank=cfg["rank"], alpha=cfg["alpha"],
              dropout=cfg["dropout"])
    if cfg["kind"] == KIND_LOKR:
        return LoKrLinear(base, rank_b=cfg["rank_b"], **kw)
    if cfg["kind"] != KIND_KRONA:
        raise ValueError(f"unknown layer kind {cfg['kind']!r}")
    return KronALinear(base, **kw)
