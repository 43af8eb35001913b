"""collect(): K-FAC factors against the Fisher materialised token by token (fp64), S²FT
restrictions, scale conventions, and what collect leaves behind (hooks, .grad, modes).

Tolerances: fp64 sums of a few dozen products agree to ~1e-15 relative; 1e-10 leaves room
for any summation order. A Hugging Face loss is computed in fp32 (logits upcast), so its
comparison uses 1e-5 (fp32's 6e-8 per rounding, over the softmax and sums of ~100 terms).
"""
import copy

import pytest
import torch
from curvature_models import Classifier, PooledClassifier, batch, sequence_batch
from models import build, family_batch, llama_batch, tiny_llama

from kronops.curvature import LayerFactors, collect, factors
from kronops.s2ft import S2FTInPlaceLinear, S2FTLinear
from kronops.testing import relative_error

FP64 = 1e-10


def close(actual, expected, tol=FP64):
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= tol, relative_error(actual, expected)


def tokens_of(model, batches, labels_of):
    """(x̄_t, g_t) of every unmasked token of ``model.head``: inputs with a 1 appended when
    it has a bias, g_t = softmax(y_t) - onehot(label_t), the gradient of token t's own loss."""
    xs, gs = [], []
    for b in batches:
        keep = b["attention_mask"].reshape(-1).bool()
        x = b["input_ids"].reshape(-1, b["input_ids"].shape[-1])[keep]
        y = model.head(x)
        labels = labels_of(b, y)
        g = torch.softmax(y, -1) - torch.nn.functional.one_hot(labels, y.shape[-1])
        if model.head.bias is not None:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        xs.append(x)
        gs.append(g)
    return torch.cat(xs).detach(), torch.cat(gs).detach()


def true_labels(b, y):
    return b["labels"].reshape(-1)[b["attention_mask"].reshape(-1).bool()]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("pad", [0, 2])
def test_empirical_factors_equal_materialised(bias, pad):
    torch.manual_seed(0)
    model = Classifier(bias=bias)
    batches = [batch(1, pad=pad), batch(2, t=4, pad=pad)]
    f = collect(model, batches, dtype=torch.float64, diagonal=True)["head"]
    x, g = tokens_of(model, batches, true_labels)
    assert f.tokens == len(x) == 2 * 3 + 2 * 4 - 2 * pad
    assert f.bias is bias and f.selection is None
    close(f.a, x.T @ x / len(x))
    close(f.g, g.T @ g / len(g))
    close(f.diag, (g.square().T @ x.square()) / len(x))


def test_sampled_factors_use_the_generator():
    torch.manual_seed(0)
    model = Classifier()
    batches = [batch(1, pad=1), batch(2, pad=1)]
    f = collect(model, batches, fisher="sampled", dtype=torch.float64,
                generator=torch.Generator().manual_seed(7))["head"]
    draws = torch.Generator().manual_seed(7)

    def sampled(b, y):
        return torch.multinomial(torch.softmax(y.detach(), -1), 1, generator=draws).squeeze(1)

    x, g = tokens_of(model, batches, sampled)
    close(f.a, x.T @ x / len(x))
    close(f.g, g.T @ g / len(g))
    again = collect(model, batches, fisher="sampled", dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))["head"]
    assert torch.equal(again.g, f.g)


def test_one_token_factors_are_the_per_example_fisher():
    """With one token, A ⊗ G is the Fisher of vec(W) (columns stacked) exactly, and the
    diagonal is that of the per-token Fisher for any number of tokens: both from autograd's
    gradient of each token's own loss."""
    torch.manual_seed(0)
    model = Classifier()
    b = batch(3, n=1, t=4)
    f = collect(model, [b], dtype=torch.float64, diagonal=True)["head"]
    grads = []
    for t in range(4):
        one = {k: v[:, t:t + 1] for k, v in b.items()}
        w, bias = torch.autograd.grad(model(**one).loss, [model.head.weight, model.head.bias])
        grads.append(torch.cat([w, bias[:, None]], 1).T.reshape(-1))
    grads = torch.stack(grads)
    fisher = grads.T @ grads / 4
    close(f.diag.T.reshape(-1), fisher.diagonal())
    first = collect(model, [{k: v[:, :1] for k, v in b.items()}], dtype=torch.float64)["head"]
    close(torch.kron(first.a, first.g), torch.outer(grads[0], grads[0]))


def test_hugging_face_loss_is_scaled_per_token():
    """The model's own (mean) loss times its label count N gives the per-token gradients of
    the logits at lm_head: softmax - onehot of the next token, 0 at the last position."""
    torch.manual_seed(0)
    model = tiny_llama(torch.float64)
    b = llama_batch()
    f = collect(model, [b], modules=["lm_head"], dtype=torch.float64)["lm_head"]
    out = model(input_ids=b["input_ids"], output_hidden_states=True)
    x = out.hidden_states[-1].reshape(-1, 48).detach()
    logits = out.logits.detach()
    g = torch.softmax(logits, -1) - torch.nn.functional.one_hot(
        torch.nn.functional.pad(b["labels"][:, 1:], (0, 1)), 97)
    g[:, -1] = 0
    g = g.reshape(-1, 97)
    assert f.tokens == x.shape[0]
    close(f.a, x.T @ x / len(x))
    close(f.g, g.T @ g / len(g), tol=1e-5)


def test_padding_is_excluded_in_every_layer():
    torch.manual_seed(0)
    model = tiny_llama(torch.float64)
    b = llama_batch()
    mask = torch.ones_like(b["input_ids"])
    mask[1, 7:] = 0
    padded = dict(b, attention_mask=mask, labels=b["labels"].masked_fill(mask == 0, -100))
    trimmed = dict(input_ids=b["input_ids"][1:, :7], labels=b["labels"][1:, :7])
    first = dict(input_ids=b["input_ids"][:1], labels=b["labels"][:1])

    def summed(model, batch):  # per-token losses summed: no N
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch.get("attention_mask")).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 97),
                                                 batch["labels"][:, 1:].reshape(-1),
                                                 reduction="sum")
    both = collect(model, [padded], loss_fn=summed, dtype=torch.float64)
    apart = collect(model, [first, trimmed], loss_fn=summed, dtype=torch.float64)
    for name, f in both.items():
        assert f.tokens == 11 + 7 == apart[name].tokens
        close(f.a, apart[name].a)
        close(f.g, apart[name].g)


def per_example(model, batches):
    """Per sequence n of every batch: x̄_n (the mean of its unmasked positions' body inputs
    with a 1 appended), g_n (the sum over those positions of its own loss's gradient at the
    body's output) and its own loss's gradient of [body.weight, body.bias] (out, in + 1)."""
    xs, gs, grads = [], [], []
    for b in batches:
        for n in range(len(b["labels"])):
            keep = b["attention_mask"][n].bool()
            x = b["input_ids"][n:n + 1, keep]
            y, logits = model.parts(x, torch.ones(x.shape[:2], dtype=torch.int64))
            loss = torch.nn.functional.cross_entropy(logits, b["labels"][n:n + 1])
            g, w, bias = torch.autograd.grad(loss, [y, model.body.weight, model.body.bias])
            xs.append(torch.cat([x[0], torch.ones(len(x[0]), 1, dtype=x.dtype)], 1).mean(0))
            gs.append(g[0].sum(0))
            grads.append(torch.cat([w, bias[:, None]], 1))
    return torch.stack(xs), torch.stack(gs), torch.stack(grads)


def test_reduce_factors_equal_the_pooled_per_example_math():
    """approx="reduce" on a sequence classifier: the body's A and G over examples (mean of
    x̄, sum of g over unmasked positions), its diagonal the exact per-example empirical
    Fisher; the head's input is already per example, so its factors are expand's."""
    torch.manual_seed(0)
    model = PooledClassifier()
    batches = [sequence_batch(1, pad=2), sequence_batch(2, n=2, t=5, pad=1)]

    def loss_fn(m, b):
        return m(**b).loss, len(b["labels"])
    f = collect(model, batches, loss_fn=loss_fn, dtype=torch.float64, diagonal=True,
                approx="reduce")
    x, g, grads = per_example(model, batches)
    body = f["body"]
    assert body.tokens == len(x) == 5
    close(body.a, x.T @ x / len(x))
    close(body.g, g.T @ g / len(g))
    close(body.diag, grads.square().mean(0))
    expand = collect(model, batches, loss_fn=loss_fn, dtype=torch.float64, diagonal=True)
    assert expand["body"].tokens == 3 * 4 - 2 + 2 * 5 - 1
    for name in ("a", "g", "diag"):
        assert torch.equal(getattr(f["head"], name), getattr(expand["head"], name))


@pytest.mark.parametrize("block", [1, 2, 3])
def test_upper_block_triangles_give_the_full_factors(monkeypatch, block):
    """Sums written as upper block triangles (columns in blocks of 1, 2, 3: the head's
    a is 7 wide with its bias, g 4) and completed at the end equal the one-block factors
    (every width below the default block), over two batches."""
    torch.manual_seed(0)
    model = Classifier(features=(6, 4), hidden=None)
    batches = [batch(1, features=6, pad=1), batch(2, t=4, features=6)]
    whole = collect(model, batches, dtype=torch.float64, diagonal=True)["head"]
    monkeypatch.setattr(factors, "GRAM_BLOCK", block)
    blocked = collect(model, batches, dtype=torch.float64, diagonal=True)["head"]
    for name in ("a", "g", "diag"):
        close(getattr(blocked, name), getattr(whole, name), tol=1e-14)
    assert torch.equal(blocked.a, blocked.a.T) and torch.equal(blocked.g, blocked.g.T)


def test_every_kth_token_is_the_picked_tokens():
    """every=2: the factors of the tokens 0, 2, 4, ... of the first batch's unmasked tokens
    and 1, 3, ... of the second's, materialised."""
    torch.manual_seed(0)
    model = Classifier()
    batches = [batch(1, pad=1), batch(2, t=4)]
    f = collect(model, batches, dtype=torch.float64, diagonal=True, every=2)["head"]
    rows = [tokens_of(model, [b], true_labels) for b in batches]
    x = torch.cat([r[0][i::2] for i, r in enumerate(rows)])
    g = torch.cat([r[1][i::2] for i, r in enumerate(rows)])
    assert f.tokens == len(x) == 3 + 4
    close(f.a, x.T @ x / len(x))
    close(f.g, g.T @ g / len(g))
    close(f.diag, (g.square().T @ x.square()) / len(x))


def test_every_kth_example_with_reduce():
    """every=2 with approx="reduce" picks examples: the factors of the sub-batches of
    examples 0, 2, 4 of the first batch and 1, 3 of the second."""
    torch.manual_seed(0)
    model = PooledClassifier()

    def loss_fn(m, b):
        return m(**b).loss, len(b["labels"])
    batches = [sequence_batch(1, n=5, pad=2), sequence_batch(2, n=4, t=5)]
    picked = [{k: v[i::2] for k, v in b.items()} for i, b in enumerate(batches)]
    got, want = (collect(model, bs, loss_fn=loss_fn, dtype=torch.float64, diagonal=True,
                         approx="reduce", every=every)["body"]
                 for bs, every in ((batches, 2), (picked, 1)))
    assert got.tokens == want.tokens == 3 + 2
    for name in ("a", "g", "diag"):
        close(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("layer", [S2FTLinear, S2FTInPlaceLinear])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_s2ft_factors_are_the_restricted_factors(layer, side):
    torch.manual_seed(0)
    model = Classifier(features=(5, 4), hidden=6)
    batches = [batch(1, pad=1), batch(2, pad=1)]
    full = collect(model, batches, dtype=torch.float64, diagonal=True)
    index = torch.tensor([0, 2, 3]) if side == "rows" else range(1, 4)
    adapted = copy.deepcopy(model)
    adapted.body = layer(adapted.body, **{side: index})
    f = collect(adapted, batches, dtype=torch.float64, diagonal=True)
    assert set(f) == {"body", "head"}  # not body.base
    s2ft, plain = f["body"], full["body"]
    assert s2ft.selection == adapted.body.chosen and s2ft.bias is False
    chosen = torch.as_tensor(list(index))
    unbiased_a = plain.a[:5, :5]
    diag = plain.diag[:, :5]
    if side == "rows":
        close(s2ft.a, unbiased_a)
        close(s2ft.g, plain.g[chosen][:, chosen])
        close(s2ft.diag, diag[chosen])
    else:
        close(s2ft.a, unbiased_a[chosen][:, chosen])
        close(s2ft.g, plain.g)
        close(s2ft.diag, diag[:, chosen])
    close(f["head"].g, full["head"].g)


class Boom(Exception):
    pass


@pytest.mark.parametrize("fails", [False, True])
def test_collect_leaves_the_model_as_it_was(fails):
    torch.manual_seed(0)
    model = Classifier(hidden=6).train()
    sentinel = torch.full_like(model.head.weight, 3.0)
    model.head.weight.grad = sentinel
    seen = []

    def loss_fn(m, b):
        seen.append(m.training)
        loss = m(**b).loss
        if fails:
            raise Boom
        return loss, 6

    if fails:
        with pytest.raises(Boom):
            collect(model, [batch(1)], loss_fn=loss_fn)
    else:
        collect(model, [batch(1)], loss_fn=loss_fn)
    assert seen == [False]
    assert model.training and model.head.training
    assert model.head.weight.grad is sentinel
    assert torch.equal(sentinel, torch.full_like(sentinel, 3.0))
    assert model.body.weight.grad is None and model.head.bias.grad is None
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks


def test_bad_arguments_are_named():
    model = Classifier()
    b = [batch(1)]
    with pytest.raises(ValueError, match="fisher"):
        collect(model, b, fisher="true")
    with pytest.raises(ValueError, match="loss_fn"):
        collect(model, b, fisher="sampled", loss_fn=lambda m, x: m(**x).loss)
    with pytest.raises(TypeError, match="dtype"):
        collect(model, b, dtype=torch.float16)
    with pytest.raises(ValueError, match="modules"):
        collect(model, b, modules=["nope"])
    with pytest.raises(TypeError, match="generator"):
        collect(model, b, generator=0)
    with pytest.raises(ValueError, match="approx"):
        collect(model, b, approx="kfac")
    with pytest.raises(ValueError, match="every"):
        collect(model, b, every=0)
    with pytest.raises(ValueError, match="labels"):
        collect(model, [dict(input_ids=b[0]["input_ids"])])
    with pytest.raises(ValueError, match="saw no tokens"):
        collect(model, [])
    with pytest.raises(ValueError, match="all -100"):
        collect(model, [dict(b[0], labels=torch.full_like(b[0]["labels"], -100))])
    seq2seq = build("bart")
    inputs = family_batch("bart")
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="encoder-decoder"):
        collect(seq2seq, [dict(inputs, attention_mask=mask, labels=inputs["decoder_input_ids"])])
    with pytest.raises(ValueError, match="diag must have shape"):
        LayerFactors(torch.eye(3), torch.eye(2), 1, False, diag=torch.ones(3, 2))


@pytest.mark.parametrize("n", [1, 5, 256, 257, 300, 700])
def test_symmetric_mirrors_the_upper_triangle(n):
    """Whole up to two blocks of GRAM_BLOCK, one block row at a time above: the upper
    triangle kept, mirrored below, whatever was written there."""
    from kronops.curvature.factors import _symmetric
    u = torch.randn(n, n, dtype=torch.float64)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.equal(_symmetric(u), torch.where(rows <= cols, u, u.T))
