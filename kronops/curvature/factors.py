"""K-FAC factors of a model's linear layers: ``collect(model, batches)`` -> {name: LayerFactors}.

For a layer y = W x (+ b), W (out, in), the Fisher block of vec(W) (columns stacked) is
approximated as A ⊗ G with

    A = E[x̄ x̄ᵀ]   (in', in'),   x̄ = [x, 1] with a bias (in' = in + 1), else x
    G = E[g gᵀ]   (out, out),    g = the per-token gradient of the loss w.r.t. y

both averaged over the same tokens: every position of the layer's input (all leading dims
flattened) except those masked out by the batch's ``attention_mask``.

Weight sharing (``approx``, the two K-FAC variants of Eschenhagen et al., 2023, "Kronecker-
Factored Approximate Curvature for Modern Neural Network Architectures"): ``"expand"``
(default) takes every position as a token of its own, right when the loss has a term per
position (a language model). ``"reduce"`` takes one row per example (dim 0 of a layer input
with more than two dims): x̄ = the mean of its unmasked positions' x̄, g = the sum of their
g, right when the positions are pooled before a per-example loss (a sequence classifier):
there every position's g is a share of one example's gradient, and "expand" weighs a
layer inside the encoder with 1/positions (independent positions) to 1/positions² (equal
ones) of the per-example Fisher a layer after the pooling gets, so EWC and merging
barely hold the encoder. Examples with no unmasked position are skipped; layers whose
input is (examples, in) are the same in both.

Subsampling (``every=k``, default 1: every row): only every k-th row (token, or example
with "reduce") of each batch's unmasked rows enters the factors, starting at row (batch
index mod k), the same rows for A, G and the diagonal. The factors are then means over
about 1/k of the rows: over the k offsets an unbiased estimate of the full means; for rows
that were independent draws the variance of each entry grows about k-fold (less where
neighbouring tokens are alike, as in a sequence). It cuts the factor GEMMs (not the
forward and backward) k-fold, as K-FAC implementations amortise curvature by estimating
it on a part of the data.

Cost: Σ x̄x̄ᵀ and Σ ggᵀ are accumulated in place (the first batch written directly, no
zero fill) as upper block triangles (``_upper_gram_``: about half of a full GEMM's flops
for wide layers), completed and divided by the row count once, at the end.

Scale conventions. g is the gradient of a *per-token* loss term, never of a mean: a loss
that averages N terms (a Hugging Face model's own loss: the mean over its N labels that are
not -100, shifted by one position for a causal LM; a classifier's mean over its N labels)
gives ∂L/∂y = (1/N) Σ ∂ℓ_n/∂y, so collect uses N·∂L/∂y. For the layer that makes the logits
this is exactly ∂ℓ_t/∂y_t, and A ⊗ G with the per-token x̄_t, g_t is the per-token average
E[(x̄ x̄ᵀ) ⊗ (g gᵀ)] factored as K-FAC does (expectations of the two factors taken apart).
Positions without a loss term of their own (a causal LM's last position, labels of -100)
are still counted: their g is whatever reaches them through the other tokens' losses.

``fisher="empirical"``: the true labels' loss. ``"sampled"``: labels drawn from the
model's predictive distribution softmax(logits) (one draw per unmasked position, from
``generator``; a generator seeded 0 on the logits' device when None), loss the sum of the
cross-entropies (N = 1).

S²FT layers (``S2FTLinear``, ``S2FTInPlaceLinear``: ``layer.chosen`` a ``Selection``) hold
only the factors of their trained part Δ (the bias is frozen, so x is never augmented):
rows R (output features): ``g`` = E[g_R g_Rᵀ] (|R|, |R|) and the full ``a`` (in, in);
cols C (input features): ``a`` = E[x_C x_Cᵀ] (|C|, |C|) and the full ``g`` (out, out).
The selection is kept as ``LayerFactors.selection``. KronA/LoKr layers (and the Linears
inside them and inside S²FT layers) are skipped: their trained parameters are the
Kronecker factors, not an (out, in) weight, and their base Linear is not always called.
"""
import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..kron.modules import KronFactors
from ..s2ft.modules import S2FTLinear
from ..s2ft.selection import Selection
from ..wrapped_linear import features, is_linear

FISHERS = ("empirical", "sampled")
APPROXIMATIONS = ("expand", "reduce")
IGNORE_INDEX = -100  # the label Hugging Face losses skip


@dataclasses.dataclass(frozen=True, eq=False)
class LayerFactors:
    """The K-FAC factors of one layer (see the module docstring).

    ``a`` (in', in') = E[x̄ x̄ᵀ]; ``g`` (out', out') = E[g gᵀ]; ``tokens``: how many tokens
    (examples with ``approx="reduce"``) were averaged; ``bias``: whether x̄ is augmented by a 1 (``a`` is (in + 1, in + 1));
    ``selection``: an S²FT layer's ``Selection`` (``a`` or ``g`` restricted to it), else
    None; ``diag`` (out', in'): the diagonal empirical Fisher E[(g x̄ᵀ)²] elementwise, when
    collected (``collect(..., diagonal=True)``; with ``approx="reduce"`` the exact per-example
    E[(Σ_positions g x̄ᵀ)²]). For S²FT layers out' × in' is the shape of
    Δ (``selection.part_shape``).
    """
    a: torch.Tensor
    g: torch.Tensor
    tokens: int
    bias: bool
    selection: Selection | None = None
    diag: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("a", "g"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2 \
                    or t.shape[0] != t.shape[1]:
                raise ValueError(f"{name} must be a square floating-point matrix, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens must be a positive int, got {self.tokens!r}")
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias must be a bool, got {self.bias!r}")
        if self.selection is not None:
            if not isinstance(self.selection, Selection):
                raise TypeError(f"selection must be a kronops.s2ft.Selection, "
                                f"got {type(self.selection).__name__}")
            if self.bias:
                raise ValueError("S²FT factors have no bias part: bias must be False")
        if self.diag is not None and (not isinstance(self.diag, torch.Tensor) or
                                      tuple(self.diag.shape) != self.shape):
            raise ValueError(f"diag must have shape {self.shape} (out', in'), got "
                             f"{getattr(self.diag, 'shape', type(self.diag).__name__)}")

    @property
    def shape(self) -> tuple[int, int]:
        """(out', in'): the shape of the ΔW these factors weigh (with its bias column)."""
        return self.g.shape[0], self.a.shape[0]

    def to(self, device) -> "LayerFactors":
        """These factors with every tensor (and the selection's index) on ``device``."""
        diag = None if self.diag is None else self.diag.to(device)
        selection = None if self.selection is None else self.selection.to(device)
        return dataclasses.replace(self, a=self.a.to(device), g=self.g.to(device),
                                   selection=selection, diag=diag)


def check_layer(name: str, module: nn.Module, f: LayerFactors) -> None:
    """``f`` (``factors[name]``) were collected for ``module``'s kind: an S²FT layer's for
    its selection, a plain layer's otherwise."""
    if isinstance(module, S2FTLinear):
        if f.selection is None or f.selection != module.chosen:
            raise ValueError(f"factors[{name!r}] were not collected for this S²FT layer's "
                             f"selection {module.chosen!r}")
    elif f.selection is not None:
        raise ValueError(f"factors[{name!r}] are an S²FT layer's, but {name!r} is a "
                         f"{type(module).__name__}")


def layers(model: nn.Module, modules=None) -> dict[str, nn.Module]:
    """The layers ``collect`` takes, by name: every nn.Linear, transformers Conv1D and S²FT
    layer outside KronA/LoKr and S²FT layers, or those of them ``modules`` names (a list of
    names or a callable ``(name, module) -> bool``)."""
    found, skip = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (KronFactors, S2FTLinear)):
            skip.append(name + ".")
        if isinstance(module, S2FTLinear) or (is_linear(module) and
                                              not isinstance(module, KronFactors)):
            found[name] = module
    if modules is None:
        return found
    if callable(modules):
        return {n: m for n, m in found.items() if modules(n, m)}
    if isinstance(modules, str) or not isinstance(modules, Iterable):
        raise TypeError(f"modules must be a list of module names or a callable, "
                        f"got {type(modules).__name__}")
    names = list(modules)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"modules: {unknown} are not linear or S²FT layers of the model "
                         "(KronA/LoKr layers are not collected)")
    return {n: found[n] for n in names}


GRAM_BLOCK = 128  # column block of _upper_gram_


def _upper_gram_(c: torch.Tensor, x: torch.Tensor, alpha: float, beta: float) -> None:
    """c (n, n) = alpha·xᵀx + beta·c (x (rows, n)) on and above the diagonal blocks only:
    for each block of GRAM_BLOCK columns of x one GEMM, x[:, block]ᵀ x[:, block start:]
    into c[block, block start:]. That is (k + 1) / 2k of xᵀx's flops for k blocks (1/2 as
    n grows, a symmetric rank-k update); below the diagonal blocks c is not written
    (``_symmetric`` completes it)."""
    n = c.shape[0]
    for i in range(0, n, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, n)
        c[i:j, i:].addmm_(x[:, i:j].T, x[:, i:], beta=beta, alpha=alpha)


def _symmetric(u: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``u``'s (a new tensor). Above two blocks
    of GRAM_BLOCK, mirrored one block row at a time, whose transpose is read from cache
    (the whole transpose, a strided pass, took 2.3 ms at 688² fp32 against 1.1 so)."""
    n = u.shape[0]
    if n <= 2 * GRAM_BLOCK:
        return u.triu().add_(u.triu(1).T)
    out = torch.empty_like(u)
    for i in range(0, n, GRAM_BLOCK):
        j = min(i + GRAM_BLOCK, n)
        block = u[i:j, i:j]
        torch.add(block.triu(), block.triu(1).T, out=out[i:j, i:j])
        if j < n:
            out[i:j, j:] = u[i:j, j:]
            out[j:, i:j] = u[i:j, j:].T
    return out


class _Layer:
    """One layer's sums over the rows seen so far: ``sums`` = [Σ x̄x̄ᵀ and Σ ggᵀ (upper block
    triangles, ``_upper_gram_``), Σ (g²)(x̄²)ᵀ with the diagonal], each written with beta=0
    the first time (no zero fill), then accumulated in place; ``factors`` divides once."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, diagonal: bool, reduce: bool):
        self.module, self.dtype, self.reduce = module, dtype, reduce
        self.selection = module.chosen if isinstance(module, S2FTLinear) else None
        self.bias = self.selection is None and getattr(module, "bias", None) is not None
        in_, out = features(module)
        if self.selection is not None:
            out, in_ = self.selection.part_shape((out, in_))
        in_ += self.bias
        self.width = in_
        device = next(module.parameters()).device
        shapes = [(in_, in_), (out, out)] + ([(out, in_)] if diagonal else [])
        self.sums = [torch.empty(shape, device=device, dtype=dtype) for shape in shapes]
        self.started = [False] * len(shapes)
        self.tokens = 0

    def add(self, i: int, left: torch.Tensor, right, alpha: float) -> None:
        """sums[i] += alpha·leftᵀ·right; ``right`` None: the upper triangle of alpha·leftᵀleft;
        "sum": alpha·left itself."""
        beta = 1.0 if self.started[i] else 0.0
        if right is None:
            _upper_gram_(self.sums[i], left, alpha, beta)
        elif isinstance(right, str):
            if beta:
                self.sums[i].add_(left, alpha=alpha)
            else:
                torch.mul(left, alpha, out=self.sums[i])
        else:
            self.sums[i].addmm_(left.T, right, beta=beta, alpha=alpha)
        self.started[i] = True

    @property
    def diagonal(self) -> bool:
        return len(self.sums) == 3

    def pools(self, t: torch.Tensor) -> bool:
        """Whether rows are examples pooled over positions (``approx="reduce"``, t (n, ..., d))."""
        return self.reduce and t.dim() > 2

    def _input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, in'): selected columns, in ``dtype``, augmented by a 1."""
        if self.selection is not None and self.selection.side == "cols":
            x = self.selection.to(x.device).part(x)
        x = x.to(self.dtype)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        return x

    def _gradient_rows(self, g: torch.Tensor) -> torch.Tensor:
        """(rows, out) -> (rows, out'): selected rows, in ``dtype``."""
        if self.selection is not None and self.selection.side == "rows":
            g = self.selection.to(g.device).part(g.T).T
        return g.to(self.dtype)

    def inputs(self, x: torch.Tensor, mask: torch.Tensor | None, pick: slice):
        """x (..., in) as the rows this layer's ``a`` averages, (rows, in'): the unmasked
        tokens, or the examples' means over them (``pools``), ``pick`` of them; and, for the
        diagonal of pooled rows, their positions (examples, positions, in') zeroed where
        masked, else None."""
        x = x.detach()
        if not self.pools(x):
            return self._input_rows(_flat_kept(x, mask)[pick]), None
        x, mask = x[pick], None if mask is None else mask[pick]
        per = self._input_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1, self.width)
        per = _masked(per, mask)
        return _pooled(per, mask, mean=True), per if self.diagonal else None

    def gradients(self, grad: torch.Tensor, mask: torch.Tensor | None, pick: slice):
        """∂L/∂y (..., out) as the per-token (or, pooled, per-example summed) gradients
        (rows, out'), ``pick`` of them, and their positions (examples, positions, out')
        when pooled, else None."""
        grad = grad.detach()
        if not self.pools(grad):
            return self._gradient_rows(_flat_kept(grad, mask)[pick]), None
        grad, mask = grad[pick], None if mask is None else mask[pick]
        per = self._gradient_rows(grad.reshape(-1, grad.shape[-1]))
        per = _masked(per.reshape(grad.shape[0], -1, per.shape[-1]), mask)
        return _pooled(per, mask, mean=False), per

    def factors(self, name: str) -> LayerFactors:
        if not self.tokens:
            raise ValueError(f"layer {name!r} saw no tokens: it was never called on an "
                             "unmasked position")
        for i, started in enumerate(self.started):  # no gradient ever reached the layer
            if not started:
                self.sums[i].zero_()
        a, g = (_symmetric(t).div_(self.tokens) for t in self.sums[:2])
        diag = self.sums[2].div_(self.tokens) if self.diagonal else None
        return LayerFactors(a, g, self.tokens, self.bias, self.selection, diag)


def _token_mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.bool()


def _mask_of(mask: torch.Tensor | None, leading: torch.Size) -> torch.Tensor | None:
    """The batch's mask where it has a layer input's ``leading`` dims, else None (all kept:
    no mask, or e.g. a classifier's pooled input)."""
    if mask is None or tuple(mask.shape) != tuple(leading):
        return None
    return mask


def _flat_kept(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """t (..., d) as (unmasked positions, d)."""
    t = t.reshape(-1, t.shape[-1])
    return t if mask is None else t[mask.reshape(-1)]


def _masked(per: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """per (examples, positions, d) with masked positions zeroed."""
    if mask is None:
        return per
    return per * mask.reshape(per.shape[0], -1, 1).to(per.dtype)


def _pooled(per: torch.Tensor, mask: torch.Tensor | None, *, mean: bool) -> torch.Tensor:
    """per (examples, positions, d), masked positions zero -> (examples, d): the sum (or the
    mean) over each example's unmasked positions; examples with none are dropped."""
    total = per.sum(1)
    if mask is None:
        return total / per.shape[1] if mean else total
    counts = mask.reshape(per.shape[0], -1).sum(1)
    kept = counts > 0
    if mean:
        total = total / counts.clamp_min(1)[:, None].to(total.dtype)
    return total[kept]


def _is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM: its loss shifts labels by one position."""
    config = getattr(model, "config", None)
    return not getattr(config, "is_encoder_decoder", False) and \
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def _label_terms(model: nn.Module, batch: dict) -> int:
    """N of a Hugging Face model's mean loss on ``batch``: its labels that are not -100
    (after the causal shift), or every label of a regression."""
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise ValueError("batches need 'labels' for the model's own loss (loss_fn=None, "
                         "fisher='empirical')")
    if labels.is_floating_point():
        return labels.numel()
    if _is_causal_lm(model):
        labels = labels[..., 1:]
    terms = int((labels != IGNORE_INDEX).sum())
    if not terms:
        raise ValueError("batches: a batch whose labels are all -100 has no loss")
    return terms


def _empirical_loss(model, batch, loss_fn) -> tuple[torch.Tensor, float]:
    """(loss, N): the true labels' loss and the number of terms it averages."""
    if loss_fn is not None:
        result = loss_fn(model, batch)
        loss, terms = result if isinstance(result, tuple) else (result, 1)
        return loss, terms
    if not isinstance(batch, dict):
        raise TypeError(f"with loss_fn=None each batch must be a dict of model inputs, "
                        f"got {type(batch).__name__}")
    return model(**batch).loss, _label_terms(model, batch)


def _sampled_loss(model, batch, generator) -> tuple[torch.Tensor, torch.Generator]:
    """Σ over unmasked positions of cross-entropy(logits, y), y drawn from softmax(logits)."""
    if not isinstance(batch, dict):
        raise TypeError(f"fisher='sampled' needs each batch as a dict of model inputs, "
                        f"got {type(batch).__name__}")
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    flat = _flat_kept(logits, _mask_of(_token_mask(batch), logits.shape[:-1]))
    if generator is None:
        generator = torch.Generator(flat.device).manual_seed(0)
    probs = torch.softmax(flat.detach().double(), -1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return nn.functional.cross_entropy(flat, labels, reduction="sum"), generator


def collect(model: nn.Module, batches, *, loss_fn: Callable | None = None,
            fisher: str = "empirical", modules=None, dtype: torch.dtype = torch.float32,
            generator: torch.Generator | None = None, diagonal: bool = False,
            approx: str = "expand", every: int = 1) -> dict[str, LayerFactors]:
    """K-FAC factors of ``model``'s linear layers over ``batches`` (see the module docstring).

    ``loss_fn(model, batch)``: the true labels' loss of one batch, either a scalar summing
    per-token losses or ``(loss, N)`` for a mean over N terms; None: a Hugging Face model's
    own ``model(**batch).loss`` (N counted from ``batch["labels"]``). ``fisher="sampled"``
    samples labels from ``model(**batch).logits`` (loss_fn must be None). ``modules``: the
    layers to collect (names, or a callable (name, module) -> bool; default every linear
    and S²FT layer, see ``layers``). Averages are kept in ``dtype`` (float32 or float64),
    Σ (in'² + out'²) per layer; ``diagonal=True`` adds the diagonal Fisher (out', in') per
    layer. ``approx``: "expand" (every position a token) or "reduce" (one row per example,
    for losses on pooled positions; see the module docstring). ``every``: use only every
    every-th row (token, or example with "reduce") of each batch, starting at the batch's
    index mod every (see the module docstring: an estimator with fewer rows; 1, the
    default, is exact). Padding
    (``batch["attention_mask"] == 0``) is excluded wherever a layer's input
    has the mask's shape; encoder-decoder models with padding are refused (their decoder
    tokens have another mask). The model runs in eval mode (no dropout) and gets its
    modes back; gradients are taken with ``torch.autograd.grad`` w.r.t. the layer outputs
    only, so no parameter's ``.grad`` changes; the hooks are removed, also on errors.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "sampled" and loss_fn is not None:
        raise ValueError("fisher='sampled' samples its labels from model(**batch).logits: "
                         "loss_fn must be None")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be a bool, got {diagonal!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if approx not in APPROXIMATIONS:
        raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
    found = layers(model, modules)
    if not found:
        raise ValueError("model has no linear or S²FT layers to collect (modules selects none)")
    state = {name: _Layer(m, dtype, diagonal, approx == "reduce") for name, m in found.items()}
    modes = {m: m.training for m in model.modules()}
    current = {}  # this batch: mask, probes, terms

    def forward_hook(layer: _Layer):
        def hook(module, args, output):
            x = args[0]
            mask = _mask_of(current["mask"], x.shape[:-1])
            pick = current["pick"]
            rows, positions = layer.inputs(x, mask, pick)
            layer.add(0, rows, None, 1.0)
            layer.tokens += rows.shape[0]
            probe = output.new_zeros((), requires_grad=True)
            current["probes"].append(probe)
            out = output + probe  # exact; makes the output's gradient reachable
            squares = rows.square() if layer.diagonal and positions is None else None

            def grad_hook(grad):
                g, per = layer.gradients(grad, mask, pick)
                scale = current["terms"] ** 2  # the per-token gradients are terms·∂L/∂y
                layer.add(1, g, None, scale)
                if squares is not None:
                    layer.add(2, g.square(), squares, scale)
                elif positions is not None:  # the examples' own gradients, squared
                    own = torch.bmm(per.transpose(1, 2), positions)
                    layer.add(2, own.square().sum(0), "sum", scale)
            out.register_hook(grad_hook)
            return out
        return hook

    handles = []
    try:
        model.eval()
        handles = [m.register_forward_hook(forward_hook(state[n])) for n, m in found.items()]
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                current.update(mask=_token_mask(batch), probes=[], terms=1,
                               pick=slice(i % every, None, every))
                if current["mask"] is not None and not bool(current["mask"].all()) and \
                        getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                    raise ValueError("batches: padding masks of encoder-decoder models are not "
                                     "handled (decoder tokens have their own mask)")
                if fisher == "empirical":
                    loss, terms = _empirical_loss(model, batch, loss_fn)
                else:
                    (loss, generator), terms = _sampled_loss(model, batch, generator), 1
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise ValueError(f"the loss must be a scalar tensor, got "
                                     f"{getattr(loss, 'shape', type(loss).__name__)}")
                current["terms"] = float(terms)
                if loss.requires_grad and current["probes"]:
                    torch.autograd.grad(loss, current["probes"], allow_unused=True)
                current.clear()
    finally:
        current.clear()
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return {name: layer.factors(name) for name, layer in state.items()}


__all__ = ["LayerFactors", "collect", "layers", "check_layer", "FISHERS", "APPROXIMATIONS"]
