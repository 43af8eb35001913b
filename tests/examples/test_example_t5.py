"""The T5 example at a tiny size: the data is right, every method runs, and each adapter
reloads into a fresh base with identical outputs."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
import finetune_t5 as example  # noqa: E402


def test_targets_are_the_string_or_its_reverse_then_eos():
    g = torch.Generator().manual_seed(0)
    copy_batch = example.make_batch(4, 5, "copy", g)
    assert torch.equal(copy_batch["labels"], copy_batch["input_ids"])
    rev = example.make_batch(4, 5, "reverse", torch.Generator().manual_seed(0))
    assert torch.equal(rev["labels"][:, :5], copy_batch["input_ids"][:, :5].flip(1))
    assert (rev["labels"][:, 5] == example.EOS).all()
    digits = rev["input_ids"][:, :5]
    assert ((digits >= example.FIRST_DIGIT) & (digits < example.FIRST_DIGIT + 10)).all()


def test_every_method_trains_and_reloads():
    results, timing = example.run(steps=2, base_steps=2, length=4, eval_strings=16)
    assert set(results) == {"base", *example.METHODS}
    full = results["full"]["trainable"]
    for method in example.METHODS:
        r = results[method]
        assert 0 < r["trainable"] <= full and timing[method] > 0
        assert 0.0 <= r["after"] <= 1.0
        if method != "full":
            assert r["trainable"] < full / 4 and r["reload_identical"]
