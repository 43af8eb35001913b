"""collect()'s K-FAC factors and the K-FAC product against curvlinops' KFACLinearOperator
(an independent implementation) on the same fp64 models and data.

curvlinops' conventions, read from its source (``curvlinops/kfac.py``, 3.0.1), and what
makes them ours:

- ``separate_weight_and_bias=False``: the weight and bias share one block with the input
  augmented by a 1, as our ``a`` is with ``bias=True`` (its default, True, keeps a separate
  G-only block for the bias).
- ``kfac_approx="expand"``: the positions of a sequence are tokens of their own, and its
  input covariance Σ x xᵀ / (N_data · positions per example) is our mean over tokens.
  ``kfac_approx="reduce"`` (inputs averaged, output gradients summed over each example's
  positions, covariances over examples) is our ``approx="reduce"``.
- ``fisher_type="empirical"``: the true labels' loss. With ``CrossEntropyLoss(reduction=
  "mean")`` it multiplies each batch's gradient by that batch's number of loss terms
  (N_batch² / (N_data · terms per example) on g gᵀ), the per-token gradient collect takes
  from a loss_fn returning (mean loss, N_batch); both divide by the total of tokens.
- ``MSELoss(reduction="mean")`` differs: it also averages over the C outputs, and
  curvlinops scales that loss by √C, so its G is C times ours for the same mean and
  N = the batch's rows (ours: the empirical Fisher of that mean times N; curvlinops': of
  each row's squared error summed over outputs and divided by √C). The test checks that
  factor, so the difference stays written down.
- Its operator acts on the parameters flattened in ``params`` order (a weight row-major);
  on the joint block it computes G [ΔW, Δb] A, the gradient of our penalty
  ½⟨ΔW, G ΔW A⟩ (strength 1), and vᵀ K v is twice the penalty.

Tolerance: fp64 sums of at most a few hundred products in another order, 1e-10 relative.
"""
import copy

import pytest
import torch
from torch import nn

from kronops.curvature import collect, ewc_penalty
from kronops.testing import relative_error

curvlinops = pytest.importorskip("curvlinops")

FP64 = 1e-10
INPUT, HIDDEN, CLASSES = 5, 6, 4


def close(actual, expected, tol=FP64):
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= tol, relative_error(actual, expected)


class ClassesFirst(nn.Module):
    """(n, positions, classes) -> (n, classes, positions): torch's and curvlinops' layout
    of sequence logits for cross-entropy."""

    def forward(self, x):
        return x.movedim(-1, 1)


class MeanOverPositions(nn.Module):
    """(n, positions, d) -> (n, d)."""

    def forward(self, x):
        return x.mean(1)


def pooled_mlp(bias):
    """A sequence classifier: the positions pooled before the head, one label per sequence."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUT, HIDDEN, bias=bias), nn.Tanh(), MeanOverPositions(),
                         nn.Linear(HIDDEN, CLASSES, bias=bias)).double()


def mlp(bias, sequence=False):
    torch.manual_seed(0)
    layers = [nn.Linear(INPUT, HIDDEN, bias=bias), nn.Tanh(), nn.Linear(HIDDEN, CLASSES, bias=bias)]
    return nn.Sequential(*layers, *([ClassesFirst()] if sequence else [])).double()


def data(sequence, targets):
    """Three batches of unequal size, inputs (n, in) or (n, 3, in), class labels or (for
    "regression") real targets of the output's shape."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for n in (3, 5, 2):
        lead = (n, 3) if sequence else (n,)
        x = torch.randn(*lead, INPUT, generator=g, dtype=torch.float64)
        if targets == "classes":
            y = torch.randint(0, CLASSES, lead, generator=g)
        else:
            y = torch.randn(*lead, CLASSES, generator=g, dtype=torch.float64)
        batches.append((x, y))
    return batches


def ours(model, batches, loss, approx="expand"):
    """collect with ``loss`` (a mean-reduced torch loss) over each batch's N terms: the
    labels for cross-entropy, the rows (every position) for MSE."""
    def loss_fn(m, b):
        x, y = b
        terms = y.numel() if isinstance(loss, nn.CrossEntropyLoss) else y.shape[:-1].numel()
        return loss(m(x), y), terms
    return collect(model, batches, loss_fn=loss_fn, dtype=torch.float64, approx=approx)


def theirs(model, batches, loss, approx="expand"):
    """curvlinops' operator with its factors computed now (it would otherwise compute them
    at its first product, from the parameters of that moment)."""
    op = curvlinops.KFACLinearOperator(
        model, loss, list(model.parameters()), batches, fisher_type="empirical",
        kfac_approx=approx, separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    return op


def their_factors(op):
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("sequence", [False, True], ids=["vectors", "sequences"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_factors_equal_curvlinops_cross_entropy(bias, sequence):
    model, batches, loss = mlp(bias, sequence), data(sequence, "classes"), nn.CrossEntropyLoss()
    factors = ours(model, batches, loss)
    a, g = their_factors(theirs(model, batches, loss))
    assert set(factors) == set(a) == set(g) == {"0", "2"}
    for name, f in factors.items():
        assert f.bias == bias and f.a.shape[0] == model.get_submodule(name).in_features + bias
        close(f.a, a[name])
        close(f.g, g[name])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_reduce_factors_equal_curvlinops(bias):
    """approx="reduce" is curvlinops' kfac_approx="reduce": inputs averaged and output
    gradients summed over the positions of each sequence."""
    model, loss = pooled_mlp(bias), nn.CrossEntropyLoss()
    batches = [(x, y[:, 0]) for x, y in data(True, "classes")]
    factors = ours(model, batches, loss, "reduce")
    a, g = their_factors(theirs(model, batches, loss, "reduce"))
    assert set(factors) == set(a) == {"0", "3"}
    assert factors["0"].tokens == 10
    for name, f in factors.items():
        close(f.a, a[name])
        close(f.g, g[name])


def test_mse_gradient_factor_is_outputs_times_ours():
    model, batches, loss = mlp(True), data(False, "regression"), nn.MSELoss()
    factors = ours(model, batches, loss)
    a, g = their_factors(theirs(model, batches, loss))
    for name, f in factors.items():
        close(f.a, a[name])
        close(CLASSES * f.g, g[name])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_kfac_product_equals_curvlinops(bias):
    """Our penalty's gradient G ΔW A (with the bias column) is curvlinops' K vec(ΔW), and
    twice the penalty is vec(ΔW)ᵀ K vec(ΔW)."""
    model, batches, loss = mlp(bias, True), data(True, "classes"), nn.CrossEntropyLoss()
    factors = ours(model, batches, loss)
    op = theirs(model, batches, loss)
    anchor = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    deltas = [(p - q).detach() for p, q in zip(model.parameters(), anchor.parameters())]
    penalty = ewc_penalty(model, factors, anchor, strength=1.0)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    products = op @ deltas
    for grad, product in zip(grads, products):
        close(grad, product)
    quadratic = sum((d * k).sum() for d, k in zip(deltas, products))
    close(2 * penalty.detach(), quadratic)
