"""Small fp64 models the curvature tests materialise the Fisher of.

``Classifier``: one Linear (optionally after a tanh Linear) followed by per-token
cross-entropy, called like a Hugging Face model (``input_ids`` are float inputs here, the
loss a mean over the labels that are not -100); ``batch`` makes inputs for it, padded
with ``attention_mask`` and labels of -100 where ``pad`` says.
"""
import types

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, features=(5, 4), bias=True, hidden=None):
        super().__init__()
        inp, out = features
        self.body = nn.Linear(inp, hidden, bias=bias).double() if hidden else None
        self.head = nn.Linear(hidden or inp, out, bias=bias).double()

    def forward(self, input_ids, attention_mask=None, labels=None):
        x = input_ids if self.body is None else torch.tanh(self.body(input_ids))
        logits = self.head(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               labels.reshape(-1), ignore_index=-100)
        return types.SimpleNamespace(logits=logits, loss=loss)


def batch(seed, n=2, t=3, features=5, classes=4, pad=0):
    """Inputs (n, t, features), labels (n, t); the last ``pad`` positions of row 0 padded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, features, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.int64)
    if pad:
        mask[0, t - pad:] = 0
        labels[0, t - pad:] = -100
    return dict(input_ids=x, attention_mask=mask, labels=labels)


class PooledClassifier(nn.Module):
    """A sequence classifier: ``body`` (tanh) on every position, the masked mean over the
    positions, then ``head``; one label per sequence, the loss their mean. ``parts`` returns
    the body's output too, so tests can take gradients at it."""

    def __init__(self, features=(5, 4), hidden=6, bias=True):
        super().__init__()
        inp, out = features
        self.body = nn.Linear(inp, hidden, bias=bias).double()
        self.head = nn.Linear(hidden, out, bias=bias).double()

    def parts(self, input_ids, attention_mask):
        y = self.body(input_ids)
        mask = attention_mask[..., None].to(y.dtype)
        pooled = (torch.tanh(y) * mask).sum(1) / mask.sum(1)
        return y, self.head(pooled)

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.parts(input_ids, attention_mask)[1]
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return types.SimpleNamespace(logits=logits, loss=loss)


def sequence_batch(seed, n=3, t=4, features=5, classes=4, pad=0):
    """Inputs (n, t, features), one label per sequence (n,); the last ``pad`` positions of
    row 0 padded."""
    b = batch(seed, n, t, features, classes, pad)
    g = torch.Generator().manual_seed(seed + 100)
    return dict(b, labels=torch.randint(0, classes, (n,), generator=g))
