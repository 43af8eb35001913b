"""The serving example at a tiny size: the data follows its rules, and every row of the one
mixed generate() batch is identical to its adapter's merged model."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
import serve_adapters as example  # noqa: E402


def test_sequences_follow_their_rule():
    g = torch.Generator().manual_seed(0)
    for rule, step in example.RULES.items():
        digits = example.sequences(rule, 5, 6, g) - example.FIRST_DIGIT
        assert ((digits >= 0) & (digits < 10)).all()
        assert torch.equal(digits[:, 1:], step(digits[:, :-1]))
        assert example.accuracy(digits + example.FIRST_DIGIT, 2, rule) == 1.0


def test_one_generate_batch_serves_every_adapter(tmp_path):
    results, timing = example.run(base_steps=2, steps=2, folder=str(tmp_path))
    assert timing["generate_s"] > 0
    assert set(results["adapters"]) == {*example.ADAPTERS, "base"}
    for name, r in results["adapters"].items():
        assert r["identical_to_merged"], name
        assert (r["bytes"] > 0) == (name != "base")
