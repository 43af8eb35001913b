"""Kronecker layers: ``KronLinear`` (weight = A (x) B), ``KronALinear`` (adapter over a frozen
Linear) and ``KronABlock`` (adapter in parallel with a whole frozen block), and the rule
that picks factor shapes: W (out, in) = A (a1, a2) (x) B (out/a1, in/a2)."""
import math

import torch
from torch import nn

from ..checks import check_features, check_number
from ..dtypes import compute_dtype
from ..wrapped_linear import WrapsLinear, check_linear
from .dispatch import materialise_pays, merge_weight_pays
from .merged import kron_linear_merged
from .ops import kron_linear
from .summed import kron_linear_summed
from .torch_kernels import kron


def near_sqrt_divisor(n: int) -> int:
    """The largest divisor of n that is at most sqrt(n) (1 for primes)."""
    for d in range(math.isqrt(n), 0, -1):
        if n % d == 0:
            return d
    return 1


def factor_shapes(in_features: int, out_features: int, a_shape=None):
    """((a1, a2), (b1, b2)) with a1*b1 = out_features and a2*b2 = in_features.

    ``a_shape=None`` picks a1, a2 as the divisors nearest below the square roots.
    """
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if a_shape is None:
        a_shape = (near_sqrt_divisor(out_features), near_sqrt_divisor(in_features))
    if (not isinstance(a_shape, (tuple, list)) or len(a_shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in a_shape)):
        raise ValueError(f"a_shape must be a pair of positive ints (a1, a2), got {a_shape!r}")
    a1, a2 = a_shape
    if out_features % a1 or in_features % a2:
        raise ValueError(f"a_shape {tuple(a_shape)} must divide (out_features, in_features) = "
                         f"({out_features}, {in_features})")
    return (a1, a2), (out_features // a1, in_features // a2)


def check_rank(rank) -> None:
    """``rank`` is None or a positive int: the inner size of A = A_u (a1, rank) @ A_v (rank, a2).

    A layer takes any such rank, above min(a1, a2) too (exact, only larger than a dense A):
    PEFT's LoKr builds such layers when it decomposes w1, and ``from_peft`` converts them.
    ``apply_adapters`` refuses those ranks, which cannot lower the parameter count."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")


class KronLinear(nn.Module):
    """A linear layer whose weight is A (x) B: y = x @ kron(A, B).T + bias.

    x: (..., in_features) -> (..., out_features). A: a_shape = (a1, a2), B: (out/a1, in/a2).
    Initialised so that kron(A, B) has the variance of nn.Linear's default weight.
    """

    def __init__(self, in_features: int, out_features: int, *, a_shape=None, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        (a1, a2), (b1, b2) = factor_shapes(in_features, out_features, a_shape)
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=device, dtype=dtype)
        self.a = nn.Parameter(torch.empty(a1, a2, **kw))
        self.b = nn.Parameter(torch.empty(b1, b2, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's U(-k, k), k = 1/sqrt(in), has variance 1/(3 in); split it evenly.
        std = (1.0 / (3 * self.in_features)) ** 0.25
        nn.init.normal_(self.a, std=std)
        nn.init.normal_(self.b, std=std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def weight(self) -> torch.Tensor:
        """The materialised (out, in) weight kron(A, B), for export and inspection."""
        return kron(self.a, self.b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_linear(x, self.a, self.b, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"a={tuple(self.a.shape)}, b={tuple(self.b.shape)}, bias={self.bias is not None}")


class KronFactors(nn.Module):
    """Trainable factors A (optionally A_u @ A_v of rank r) and B, with B zero-initialised."""

    def _init_factors(self, in_features, out_features, a_shape, rank, alpha, device, dtype):
        (a1, a2), (b1, b2) = factor_shapes(in_features, out_features, a_shape)
        check_rank(rank)
        if alpha is None:
            alpha = float(rank) if rank is not None else 1.0
        self.rank, self.alpha = rank, check_number("alpha", alpha)
        self.scale = self.alpha / rank if rank is not None else self.alpha
        kw = dict(device=device, dtype=dtype)
        if rank is None:
            self.a = nn.Parameter(torch.empty(a1, a2, **kw))
            nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        else:
            self.a_u = nn.Parameter(torch.empty(a1, rank, **kw))
            self.a_v = nn.Parameter(torch.empty(rank, a2, **kw))
            nn.init.kaiming_uniform_(self.a_u, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.a_v, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(b1, b2, **kw))

    def factor_a(self) -> torch.Tensor:
        """A (a1, a2): the parameter itself, or A_u @ A_v when low-rank."""
        return self.a if self.rank is None else self.a_u @ self.a_v

    def factor_b(self) -> torch.Tensor:
        """B (b1, b2)."""
        return self.b

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """scale * x @ kron(A, B).T, factors cast to x's dtype."""
        return kron_linear(x, self.factor_a().to(x.dtype), self.factor_b().to(x.dtype),
                           scale=self.scale)

    def delta_weight(self) -> torch.Tensor:
        """scale * kron(A, B): the (out, in) update, materialised (for merging and export)."""
        return self.scale * kron(self.factor_a(), self.factor_b())

    def _factor_repr(self) -> str:
        a = f"a={tuple(self.a.shape)}" if self.rank is None else \
            f"a=({self.a_u.shape[0]}, {self.a_v.shape[1]}), rank={self.rank}"
        return f"{a}, b={tuple(self.b.shape)}, scale={self.scale:g}"


def freeze(module: nn.Module) -> None:
    """Make every parameter of ``module`` non-trainable."""
    for p in module.parameters():
        p.requires_grad_(False)


class KronALinear(WrapsLinear, KronFactors):
    """KronA / LoKr adapter over a frozen nn.Linear (or transformers Conv1D):
    y = base(x) + s * dropout(x) @ kron(A, B).T.

    A: a_shape = (a1, a2) (None: near the square roots), or A_u (a1, r) @ A_v (r, a2) with
    ``rank`` r; B: (out/a1, in/a2), zero at start so a fresh adapter changes nothing.
    s = alpha / r with a rank (alpha defaults to r), else alpha (default 1.0).
    ``merge()`` adds s * kron(A, B) into base.weight; ``unmerge()`` takes it out again.
    """

    def __init__(self, base: nn.Module, *, a_shape=None, rank: int | None = None,
                 alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        check_linear("base", base)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self._init_factors(self.in_features, self.out_features, a_shape, rank, alpha,
                           base.weight.device, base.weight.dtype)
        freeze(base)  # after every check: a refused call leaves base as it was
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features("x", x, self.in_features)
        route = None if self.merged else self._route(x)
        if route is not None:
            return route(x, self.base_weight, self.factor_a().to(x.dtype),
                         self.factor_b().to(x.dtype), self.base.bias, scale=self.scale)
        y = self.base(x)
        if self.merged:
            return y
        return y + self.adapter(self.dropout(x))

    def _route(self, x: torch.Tensor):
        """The base and the adapter as one autograd node, where the base is frozen and
        unhooked and dropout is off (the adapter sees the base's x): one GEMM on W + s·A⊗B
        (``kron_linear_merged``) where ``dispatch.merge_weight_pays`` says so for the dtype
        the call computes in, else the base's GEMMs summed into the adapter's outputs
        (``kron_linear_summed``) unless the adapter materialises A⊗B
        (``dispatch.materialise_pays``). None: the two layers, summed."""
        base = self.base
        if (base.weight.requires_grad or base._forward_hooks or base._forward_pre_hooks
                or (self.training and isinstance(self.dropout, nn.Dropout))):
            return None
        device = x.device.type
        if merge_weight_pays(device, x.numel() // max(x.shape[-1], 1), self.in_features,
                             self.out_features, compute_dtype(device, x)):
            return kron_linear_merged
        if materialise_pays(device, self.in_features, self.out_features):
            return None
        return kron_linear_summed

    @torch.no_grad()
    def merge(self) -> None:
        """Add s * kron(A, B) into the base weight; forward then runs the base alone."""
        if self.merged:
            raise RuntimeError("KronALinear is already merged; unmerge() first")
        self.base_weight.add_(self.delta_weight().to(self.base_weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged update from the base weight (exact up to its dtype's rounding)."""
        if not self.merged:
            raise RuntimeError("KronALinear is not merged")
        self.base_weight.sub_(self.delta_weight().to(self.base_weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"{self._factor_repr()}, merged={self.merged}"


class KronABlock(KronFactors):
    """KronA^B / KronA^B_res: an adapter in parallel with a frozen block (e.g. an FFN).

    y = block(x) + s * x @ kron(A, B).T  (+ s_res * x when ``residual``; s_res is learnable
    and starts at 0). x: (..., in_features) -> (..., out_features); factors as KronALinear.
    """

    def __init__(self, block: nn.Module, in_features: int, out_features: int, *,
                 residual: bool = False, a_shape=None, rank: int | None = None,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {residual!r}")
        if residual and in_features != out_features:
            raise ValueError(f"residual needs in_features == out_features, got "
                             f"{in_features} and {out_features}")
        if device is None or dtype is None:
            ref = next(block.parameters(), None)
            device = device if device is not None or ref is None else ref.device
            dtype = dtype if dtype is not None or ref is None else ref.dtype
        self._init_factors(in_features, out_features, a_shape, rank, alpha, device, dtype)
        self.block = block
        freeze(block)  # after every check: a refused call leaves block as it was
        self.in_features, self.out_features = in_features, out_features
        self.residual_scale = nn.Parameter(torch.zeros((), device=device, dtype=dtype)) \
            if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features("x", x, self.in_features)
        y = self.block(x) + self.adapter(x)
        if self.residual_scale is not None:
            y = y + self.residual_scale.to(x.dtype) * x
        return y

    def extra_repr(self) -> str:
        return f"{self._factor_repr()}, residual={self.residual_scale is not None}"
