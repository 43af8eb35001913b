"""The benchmark runner on CPU with a tiny shape set: table, JSON fields, flagging, --full refusal."""
import json

import pytest
import torch

from bench import __main__ as bench_main
from bench.cases import Provider, build_case
from bench.kron_cases import krona_layer_cases, kron_linear_cases
from bench.s2ft_cases import inplace_adamw_cases
from bench.sparse_cases import sparse_linear_cases
from bench.report import table, write_json
from bench.runner import run_case

ROW_FIELDS = {"op", "mode", "shape", "size", "dtype", "device", "provider", "median_ms", "p20_ms",
              "p80_ms", "gbps", "tflops", "peak_memory_bytes", "rel_error", "error_ok",
              "speedup_vs_naive"}


def test_runner_rows_and_json(tmp_path):
    rows = []
    for case in kron_linear_cases(8, 16, 12, torch.float32, torch.device("cpu")):
        rows += run_case(case, torch.float32, torch.device("cpu"))
    assert len(rows) == 9 and all(ROW_FIELDS <= set(r) for r in rows)
    assert all(r["error_ok"] and r["median_ms"] > 0 for r in rows)
    assert "kronops" in table(rows)
    path = tmp_path / "r.json"
    write_json(str(path), {"device": "cpu"}, rows)
    assert json.loads(path.read_text())["results"][0]["provider"] == "kronops"


def test_wrong_result_is_flagged():
    x = torch.randn(4, 6, requires_grad=True)
    a, b = torch.randn(2, 2, requires_grad=True), torch.randn(3, 3, requires_grad=True)

    def right(x, a, b):
        return x @ torch.kron(a, b).T

    def wrong(x, a, b):
        return right(x, a, b) * 1.01

    case = build_case("kron_linear", "forward", "tiny", 24, 1, 1,
                      {"right": Provider(right), "wrong": Provider(wrong)}, right,
                      [x, a, b], [[x, a, b]] * 3)
    rows = {r["provider"]: r for r in run_case(case, torch.float32, torch.device("cpu"))}
    assert rows["right"]["error_ok"] and not rows["wrong"]["error_ok"]
    assert "FAIL" in table(list(rows.values()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_full_refuses_without_gpu(capsys):
    assert bench_main.main(["--full"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_end_to_end_writes_json_and_png(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_main, "default_cases",
                        lambda full, dtype, device: kron_linear_cases(8, 16, 12, dtype, device))
    out = tmp_path / "cpu.json"
    assert bench_main.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["device"].startswith("CPU")
    assert (tmp_path / "cpu.png").stat().st_size > 0


def test_peft_lokr_computes_the_same_layer():
    pytest.importorskip("peft")
    rows = []
    for case in krona_layer_cases(8, 16, 16, torch.float32, torch.device("cpu")):
        rows += run_case(case, torch.float32, torch.device("cpu"))
    by_name = {r["provider"]: r for r in rows}
    assert by_name["PEFT LoKr"]["rel_error"] < 1e-5 and by_name["PEFT LoKr"]["error_ok"]
    assert any(name.startswith("PEFT LoRA") for name in by_name)


def test_s2ft_cases_are_checked():
    rows = []
    for case in [*sparse_linear_cases(8, 32, 24, 0.25, "rows", torch.float32, torch.device("cpu")),
                 *sparse_linear_cases(8, 32, 24, 0.25, "cols", torch.float32, torch.device("cpu")),
                 *inplace_adamw_cases(16, 32, 0.25, torch.float32, torch.device("cpu"))]:
        rows += run_case(case, torch.float32, torch.device("cpu"))
    checked = [r for r in rows if r["rel_error"] is not None]
    assert len(checked) == 3 * 3 * 2 + 3 and all(r["error_ok"] for r in checked)
