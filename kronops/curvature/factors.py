"""K-FAC factors of a model's linear layers: ``collect(model, batches)`` -> {name: LayerFactors}.

For a layer y = W x (+ b), W (out, in), the Fisher block of vec(W) (columns stacked) is
approximated as A ⊗ G with

    A = E[x̄ x̄ᵀ]   (in', in'),   x̄ = [x, 1] with a bias (in' = in + 1), else x
    G = E[g gᵀ]   (out, out),    g = the per-token gradient of the loss w.r.t. y

both averaged over the same tokens: every position of the layer's input (all leading dims
flattened) except those masked out by the batch's ``attention_mask``.

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
IGNORE_INDEX = -100  # the label Hugging Face losses skip


@dataclasses.dataclass(frozen=True, eq=False)
class LayerFactors:
    """The K-FAC factors of one layer (see the module docstring).

    ``a`` (in', in') = E[x̄ x̄ᵀ]; ``g`` (out', out') = E[g gᵀ]; ``tokens``: how many tokens
    were averaged; ``bias``: whether x̄ is augmented by a 1 (``a`` is (in + 1, in + 1));
    ``selection``: an S²FT layer's ``Selection`` (``a`` or ``g`` restricted to it), else
    None; ``diag`` (out', in'): the diagonal empirical Fisher E[(g x̄ᵀ)²] elementwise, when
    collected (``collect(..., diagonal=True)``). For S²FT layers out' × in' is the shape of
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


class _Layer:
    """One layer's running averages and the current batch's sums."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, diagonal: bool):
        self.module, self.dtype = module, dtype
        self.selection = module.chosen if isinstance(module, S2FTLinear) else None
        self.bias = self.selection is None and getattr(module, "bias", None) is not None
        in_, out = features(module)
        if self.selection is not None:
            out, in_ = self.selection.part_shape((out, in_))
        in_ += self.bias
        device = next(module.parameters()).device
        self.mean = [torch.zeros(n, n, device=device, dtype=dtype) for n in (in_, out)]
        self.sums = [torch.zeros_like(m) for m in self.mean]
        if diagonal:
            self.mean.append(torch.zeros(out, in_, device=device, dtype=dtype))
            self.sums.append(torch.zeros_like(self.mean[-1]))
        self.tokens = self.batch_tokens = 0

    def inputs(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x (..., in) as the rows this layer's ``a`` averages: (tokens, in'), masked,
        restricted to selected columns, augmented by a 1."""
        x = x.detach().reshape(-1, x.shape[-1])
        if keep is not None:
            x = x[keep]
        if self.selection is not None and self.selection.side == "cols":
            x = self.selection.to(x.device).part(x)
        x = x.to(self.dtype)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        return x

    def gradients(self, grad: torch.Tensor, keep: torch.Tensor | None,
                  terms: float) -> torch.Tensor:
        """∂L/∂y (..., out) as per-token gradients (tokens, out'): masked, restricted to
        selected rows, times the loss's number of terms."""
        g = grad.detach().reshape(-1, grad.shape[-1])
        if keep is not None:
            g = g[keep]
        if self.selection is not None and self.selection.side == "rows":
            g = self.selection.to(g.device).part(g.T).T
        return g.to(self.dtype) * terms

    def fold(self) -> None:
        """Fold the batch's sums into the running means (mean += (sum - n·mean) / total)."""
        n = self.batch_tokens
        if n:
            total = self.tokens + n
            for mean, s in zip(self.mean, self.sums):
                mean.add_((s - n * mean) / total)
                s.zero_()
            self.tokens = total
        self.batch_tokens = 0

    def factors(self, name: str) -> LayerFactors:
        if not self.tokens:
            raise ValueError(f"layer {name!r} saw no tokens: it was never called on an "
                             "unmasked position")
        a, g, *diag = self.mean
        return LayerFactors(a, g, self.tokens, self.bias, self.selection,
                            diag[0] if diag else None)


def _token_mask(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.bool()


def _keep(mask: torch.Tensor | None, leading: torch.Size) -> torch.Tensor | None:
    """The flat unmasked positions of a layer input with ``leading`` dims, or None (all kept)
    when there is no mask or it is not of that shape (e.g. a classifier's pooled input)."""
    if mask is None or tuple(mask.shape) != tuple(leading):
        return None
    return mask.reshape(-1)


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
    flat = logits.reshape(-1, logits.shape[-1])
    keep = _keep(_token_mask(batch), logits.shape[:-1])
    if keep is not None:
        flat = flat[keep]
    if generator is None:
        generator = torch.Generator(flat.device).manual_seed(0)
    probs = torch.softmax(flat.detach().double(), -1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return nn.functional.cross_entropy(flat, labels, reduction="sum"), generator


def collect(model: nn.Module, batches, *, loss_fn: Callable | None = None,
            fisher: str = "empirical", modules=None, dtype: torch.dtype = torch.float32,
            generator: torch.Generator | None = None,
            diagonal: bool = False) -> dict[str, LayerFactors]:
    """K-FAC factors of ``model``'s linear layers over ``batches`` (see the module docstring).

    ``loss_fn(model, batch)``: the true labels' loss of one batch, either a scalar summing
    per-token losses or ``(loss, N)`` for a mean over N terms; None: a Hugging Face model's
    own ``model(**batch).loss`` (N counted from ``batch["labels"]``). ``fisher="sampled"``
    samples labels from ``model(**batch).logits`` (loss_fn must be None). ``modules``: the
    layers to collect (names, or a callable (name, module) -> bool; default every linear
    and S²FT layer, see ``layers``). Averages are kept in ``dtype`` (float32 or float64),
    Σ (in'² + out'²) per layer; ``diagonal=True`` adds the diagonal Fisher (out', in') per
    layer. Padding (``batch["attention_mask"] == 0``) is excluded wherever a layer's input
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
    found = layers(model, modules)
    if not found:
        raise ValueError("model has no linear or S²FT layers to collect (modules selects none)")
    state = {name: _Layer(m, dtype, diagonal) for name, m in found.items()}
    modes = {m: m.training for m in model.modules()}
    current = {}  # this batch: mask, probes, terms

    def forward_hook(layer: _Layer):
        def hook(module, args, output):
            x = args[0]
            keep = _keep(current["mask"], x.shape[:-1])
            rows = layer.inputs(x, keep)
            layer.sums[0].addmm_(rows.T, rows)
            layer.batch_tokens += rows.shape[0]
            probe = output.new_zeros((), requires_grad=True)
            current["probes"].append(probe)
            out = output + probe  # exact; makes the output's gradient reachable
            squares = rows.square() if len(layer.sums) == 3 else None  # kept for diag only

            def grad_hook(grad):
                g = layer.gradients(grad, keep, current["terms"])
                layer.sums[1].addmm_(g.T, g)
                if squares is not None:
                    layer.sums[2].addmm_(g.square().T, squares)
            out.register_hook(grad_hook)
            return out
        return hook

    handles = []
    try:
        model.eval()
        handles = [m.register_forward_hook(forward_hook(state[n])) for n, m in found.items()]
        with torch.enable_grad():
            for batch in batches:
                current.update(mask=_token_mask(batch), probes=[], terms=1)
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
                for layer in state.values():
                    layer.fold()
    finally:
        current.clear()
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return {name: layer.factors(name) for name, layer in state.items()}


__all__ = ["LayerFactors", "collect", "layers", "check_layer", "FISHERS"]
