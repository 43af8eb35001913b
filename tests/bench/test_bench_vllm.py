"""The vLLM rows (``--ops vllm``) where vLLM is absent: skipped with the reason, nothing built;
and the runner's plumbing they use: a reference per provider computed from that provider's
own output, and tokens/s. The rows themselves run in the vLLM environment
(tests/vllm_serving/test_vllm_bench.py)."""
import torch

from bench import __main__ as bench_main
from bench.cases import Case
from bench.optional import load_vllm, skipped
from bench.report import table
from bench.runner import run_case
from bench.suite import resolve_ops
from bench.vllm_cases import vllm_cases

CPU = torch.device("cpu")
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=32)


def test_vllm_family_names_prefill_and_decode():
    assert resolve_ops(["vllm"]) == {"vLLM prefill", "vLLM decode"}
    assert resolve_ops(["vLLM-decode"]) == {"vLLM decode"}


def test_without_vllm_the_rows_are_skipped_with_the_reason(tmp_path, capsys):
    vllm, why = load_vllm()
    if vllm is not None:  # the vLLM environment runs the rows instead
        assert why is None
        return
    assert vllm_cases(TINY, 2, 4, 2, (1,), torch.float32, CPU) == []
    assert f"the vLLM serving rows are skipped: {why}" in skipped()
    status = bench_main.main(["--ops", "vllm", "--out", str(tmp_path / "r.json"),
                              "--no-overhead"])
    err = capsys.readouterr().err
    assert status == 2 and f"vLLM serving rows are skipped: {why}" in err
    assert "no case of vLLM decode, vLLM prefill" in err


def test_each_provider_is_checked_against_the_reference_of_its_own_output():
    """A generation's reference scores the tokens the provider chose: a provider whose
    scores are off fails even though its tokens are its own."""
    tokens = torch.tensor([[3, 1, 4], [1, 5, 9]])

    def scores(t):
        return t.double() / 10

    providers = {"kronops right": lambda i: (tokens, scores(tokens)),
                 "kronops wrong": lambda i: (tokens + 1, scores(tokens)),
                 "unchecked": lambda i: None}
    references = {name: lambda out: (out[0], scores(out[0])) for name in providers
                  if name != "unchecked"}
    case = Case("vLLM decode", "generate", "tiny", 6, 0, 0, providers, lambda: None,
                {"unchecked"}, references=references, tokens=6)
    rows = {r["provider"]: r for r in run_case(case, torch.float32, CPU, budget_s=0.0)}
    assert rows["kronops right"]["rel_error"] == 0.0 and rows["kronops right"]["error_ok"]
    assert rows["kronops wrong"]["rel_error"] > 0.1 and not rows["kronops wrong"]["error_ok"]
    assert rows["unchecked"]["rel_error"] is None
    for row in rows.values():
        assert row["tokens_per_s"] == 6 / (row["median_ms"] * 1e-3)
    assert "tokens/s" in table(list(rows.values()))
