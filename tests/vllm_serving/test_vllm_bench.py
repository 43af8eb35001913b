"""The vLLM benchmark rows (``python -m bench --ops vllm``, bench/vllm_cases.py) at a tiny
size: both engines start, every provider's generated tokens are checked against fp64
transformers with each row's adapter, and the rows carry tokens/s. Keeps the rows from
rotting; the timing itself is not checked.

Runs where vllm is importable (.ci/vllm builds that environment); skipped elsewhere.
"""
import pytest
import torch

pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

from bench.runner import run_case  # noqa: E402
from bench.suite import resolve_ops  # noqa: E402
from bench.vllm_cases import BASE, BASE_ROWS, shutdown, vllm_cases  # noqa: E402

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


@pytest.fixture
def cases():
    """The rows at a tiny size; their two engines stopped afterwards (~2 GB each)."""
    yield vllm_cases(TINY, rows=4, prompt=8, decode=3, counts=(1, 4), dtype=torch.float32,
                     device=torch.device("cpu"))
    shutdown()


def test_vllm_rows_are_checked_and_timed(cases):
    assert {c.op for c in cases} == resolve_ops(["vllm"])
    assert len(cases) == 4
    for case in cases:
        rows = run_case(case, torch.float32, torch.device("cpu"), budget_s=0.0)
        providers = {r["provider"] for r in rows}
        assert {"kronops KronA", "kronops S²FT", "kronops LoKr (PEFT folders)", BASE,
                BASE_ROWS} <= providers, providers
        assert any(p.startswith("vLLM LoRA") for p in providers), providers
        for row in rows:
            assert row["rel_error"] is not None and row["error_ok"], row
            assert row["tokens_per_s"] > 0, row
