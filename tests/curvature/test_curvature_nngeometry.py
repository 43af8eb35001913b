"""collect()'s K-FAC factors and the K-FAC quadratic form against nngeometry's PMatKFAC (a
second independent implementation; skipped when nngeometry is absent) on fp64 MLPs.

nngeometry's conventions, read from its source (0.4: ``metrics.FIM``,
``backend/torch_hooks``): ``FIM(..., variant="regression", function=f)`` takes the
Jacobian of f's C outputs per example and accumulates Σ_n x̄x̄ᵀ and Σ_i Σ_n gᵢgᵢᵀ, then
divides A by N/√C and G by √C·N. With f = the per-example cross-entropy (C = 1) g is each
example's own loss gradient at the layer output, so its factors are our empirical ones
exactly; with f = the model's C outputs its A is √C times ours (A does not depend on f).
The bias shares the weight's block with the input augmented by a 1, as ours. Its Linear
factors take (examples, in) inputs only (no positions).

Tolerance: fp64 sums of a few dozen products in another order, 1e-10 relative.
"""
import copy

import pytest
import torch
from torch import nn

from kronops.curvature import collect, ewc_penalty
from kronops.testing import relative_error

nngeometry = pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatKFAC  # noqa: E402
from nngeometry.object.vector import PVector  # noqa: E402

FP64 = 1e-10
CLASSES = 4


def close(actual, expected):
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= FP64, relative_error(actual, expected)


def setup(bias):
    """An MLP 5 -> 6 -> 4, ten examples in batches of 4, 4, 2 (as a DataLoader and as
    collect's batches), and collect's empirical factors over the mean cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.Tanh(),
                          nn.Linear(6, CLASSES, bias=bias)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (10,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    ours = collect(model, list(loader), dtype=torch.float64,
                   loss_fn=lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), len(b[1])))
    return model, loader, ours


def per_example_loss(model):
    return lambda x, y: nn.functional.cross_entropy(model(x), y, reduction="none")[:, None]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_factors_equal_nngeometry(bias):
    model, loader, ours = setup(bias)
    theirs = FIM(model, loader, PMatKFAC, variant="regression",
                 function=per_example_loss(model)).data
    assert set(theirs) == set(ours) == {"0", "2"}
    for name, f in ours.items():
        assert f.bias == bias
        close(f.a, theirs[name][0])
        close(f.g, theirs[name][1])
    outputs = FIM(model, loader, PMatKFAC, variant="regression").data
    for name, f in ours.items():
        close(CLASSES ** 0.5 * f.a, outputs[name][0])


def test_quadratic_form_is_twice_the_penalty():
    model, loader, ours = setup(True)
    kfac = FIM(model, loader, PMatKFAC, variant="regression", function=per_example_loss(model))
    anchor = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    v = PVector.from_model(model) - PVector.from_model(anchor)
    close(2 * ewc_penalty(model, ours, anchor, strength=1.0).detach(), kfac.vTMv(v).detach())
