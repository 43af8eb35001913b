"""The benchmark runner on CPU with a tiny shape set: table, JSON fields, flagging, --full refusal,
--ops names, baselines that overflow, where results go, the plot, and the CPU timer's fairness."""
import contextlib
import json

import pytest
import torch

from bench import __main__ as bench_main
from bench.cases import Provider, build_case
from bench.curvature_cases import ewc_penalty_cases, kfac_collect_cases
from bench.kron_cases import krona_layer_cases, kron_linear_cases, kron_matmul_cases
from bench.optional import load_curvlinops, load_nngeometry, load_transformers
from bench.s2ft_adamw_cases import inplace_adamw_cases
from bench.s2ft_linear_cases import sparse_linear_cases
from bench.s2ft_model_cases import llama_step_cases
from bench.report import figure, markdown, table, write_json
from bench.runner import failures, run_case
from bench.serving_cases import serving_cases
from bench.suite import OPS, resolve_ops
from bench.timing import gpu_timing, time_providers

CPU = torch.device("cpu")
FAST = 0.02  # timing budget per case (s): the tests check plumbing, not speed
ROW_FIELDS = {"op", "mode", "shape", "size", "dtype", "device", "provider", "kronops",
              "median_ms", "min_ms", "p20_ms", "p80_ms", "calls", "gbps", "tflops",
              "peak_memory_bytes", "rel_error", "overflow", "error_ok", "speedup_vs_naive"}
QUICK = ["--no-overhead", "--budget", str(FAST)]


def test_runner_rows_and_json(tmp_path):
    rows = []
    for case in kron_linear_cases(8, 16, 12, torch.float32, CPU):
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    assert len(rows) == 9 and all(ROW_FIELDS <= set(r) for r in rows)
    assert all(r["error_ok"] and 0 < r["min_ms"] <= r["median_ms"] for r in rows)
    assert "kronops" in table(rows)
    path = tmp_path / "r.json"
    write_json(str(path), {"device": "cpu"}, rows)
    assert json.loads(path.read_text())["results"][0]["provider"] == "kronops"


def _kron_case(kronops_fn, naive_fn, dtype=torch.float32):
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    a = torch.randn(2, 2, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 3, dtype=dtype, requires_grad=True)
    return build_case("kron_linear", "forward", "tiny", 24, 1, 1,
                      {"kronops": Provider(kronops_fn), "naive (torch.kron)": Provider(naive_fn)},
                      _right, [x, a, b], [[x, a, b]] * 3)


def _right(x, a, b):
    return x @ torch.kron(a, b).T


def _wrong(x, a, b):
    return _right(x, a, b) * 1.01


def _overflows(x, a, b):  # fp16 overflows in the scaled product (65504 is fp16's largest)
    return (x * 6e4) @ torch.kron(a, b).T / 6e4


def test_wrong_result_is_flagged():
    rows = {r["provider"]: r for r in run_case(_kron_case(_wrong, _right), torch.float32, CPU,
                                               budget_s=FAST)}
    assert not rows["kronops"]["error_ok"] and rows["naive (torch.kron)"]["error_ok"]
    assert failures(list(rows.values())) == [rows["kronops"]]
    assert "FAIL" in table(list(rows.values()))


def test_baseline_out_of_tolerance_is_marked_not_failed():
    rows = {r["provider"]: r for r in run_case(_kron_case(_right, _overflows, torch.float16),
                                               torch.float16, CPU, budget_s=FAST)}
    naive = rows["naive (torch.kron)"]
    assert naive["overflow"] and naive["rel_error"] is None and not naive["error_ok"]
    assert not naive["kronops"] and rows["kronops"]["error_ok"] and failures(list(rows.values())) == []
    text = table(list(rows.values()))
    assert "overflow (baseline)" in text and "FAIL" not in text
    rows = run_case(_kron_case(_right, _wrong), torch.float32, CPU, budget_s=FAST)
    assert failures(rows) == [] and "(baseline)" in table(rows)


@pytest.mark.parametrize("kronops_fn, status", [(_right, 0), (_overflows, 1)])
def test_cli_float16_fails_only_on_kronops(tmp_path, monkeypatch, capsys, kronops_fn, status):
    monkeypatch.setattr(bench_main, "default_cases", lambda full, dtype, device, ops=None:
                        [_kron_case(kronops_fn, _overflows, dtype)])
    assert bench_main.main(["--dtype", "float16", "--out", str(tmp_path / "r.json"), *QUICK]) == status
    out = capsys.readouterr().out
    assert "overflow (baseline)" in out and ("overflow FAIL" in out) == bool(status)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_full_refuses_without_gpu(capsys):
    assert bench_main.main(["--full"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def _tiny_cases(full, dtype, device, ops=None):
    return [*kron_linear_cases(8, 16, 12, dtype, device, modes=("forward",)),
            *kron_matmul_cases(8, [(2, 2)] * 3, dtype, device, modes=("forward",))]


def test_cli_end_to_end_writes_json_and_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "default_cases", _tiny_cases)
    out = tmp_path / "mine" / "b.json"
    assert bench_main.main(["--out", str(out), *QUICK]) == 0
    assert json.loads(out.read_text())["device"].startswith("CPU")
    assert (tmp_path / "mine" / "b.png").stat().st_size > 0
    assert f"wrote {out}" in capsys.readouterr().out


def test_default_output_is_untracked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "default_cases", _tiny_cases)
    monkeypatch.setattr(bench_main, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(bench_main, "LOCAL_RESULTS", str(tmp_path / "results" / "local"))
    assert bench_main.main(QUICK) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["local"]
    assert sorted(p.name for p in (tmp_path / "results" / "local").iterdir()) == ["cpu.json", "cpu.png"]
    assert str(tmp_path / "results" / "local" / "cpu.json") in capsys.readouterr().out


@pytest.mark.parametrize("name, ops", [
    ("kron_linear", {"kron_linear"}),
    ("kron_matmul", {"kron_matmul[3]", "kron_matmul[2]"}),
    ("kron_matmul[3]", {"kron_matmul[3]"}),
    ("krona_layer", {"KronALinear"}),
    ("KronALinear", {"KronALinear"}),
    ("sparse_linear", {"sparse_linear[rows]", "sparse_linear[cols]"}),
    ("sparse_linear[cols]", {"sparse_linear[cols]"}),
    ("s2ft", {"sparse_linear[rows]", "sparse_linear[cols]", "InPlaceAdamW", "LLaMA step"}),
    ("LLaMA step", {"LLaMA step"}),
    ("serving", {"AdapterBank", "AdapterBank switch"}),
    ("kron_linear,s2ft", {"kron_linear", "sparse_linear[rows]", "sparse_linear[cols]",
                          "InPlaceAdamW", "LLaMA step"}),
])
def test_ops_accepts_families_and_op_names(name, ops):
    assert bench_main.parse_args(["--ops", name]).op_names == ops


def test_ops_family_selects_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "default_cases", _tiny_cases)
    assert bench_main.main(["--ops", "kron_matmul", "--out", str(tmp_path / "r.json"), *QUICK]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["op"] for r in rows} == {"kron_matmul[3]"}


def test_ops_unknown_name_exits_2_listing_valid_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main.parse_args(["--ops", "kron_linear,kron_lnear"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "kron_lnear" in err and all(n in err for n in ("s2ft", "krona_layer", "kron_matmul[3]"))


def test_help_lists_names_without_rest_markup(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    assert all(name in out for name in ["kron_linear", "kron_matmul", "krona_layer", "sparse_linear",
                                        "s2ft", *OPS])


def test_op_names_cover_every_case():
    """OPS (what --ops resolves to) names every op the case builders produce."""
    f32 = torch.float32
    cases = [*kron_linear_cases(4, 16, 12, f32, CPU, modes=("forward",)),
             *kron_matmul_cases(4, [(2, 2)] * 3, f32, CPU, modes=("forward",)),
             *kron_matmul_cases(4, [(2, 2)] * 2, f32, CPU, modes=("forward",)),
             *krona_layer_cases(4, 16, 16, f32, CPU),
             *sparse_linear_cases(4, 16, 8, 0.25, "rows", f32, CPU, modes=("forward",)),
             *sparse_linear_cases(4, 16, 8, 0.25, "cols", f32, CPU, modes=("forward",)),
             *inplace_adamw_cases(16, 8, 0.25, f32, CPU)]
    if load_transformers()[0] is not None:
        tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
        cases += llama_step_cases(tiny, 1, 4, 0.5, f32, CPU)
        cases += serving_cases(TINY_SERVING, 4, 3, (2,), f32, CPU)
        cases += kfac_collect_cases(tiny, 1, 4, f32, CPU)
        cases += ewc_penalty_cases(tiny, 1, 4, f32, CPU)
    assert {c.op for c in cases} <= set(OPS)
    assert resolve_ops(OPS) == set(OPS)


def _rows_of_every_kind(roofline: bool) -> list[dict]:
    providers = {
        ("kron_linear", "forward", "8x16->12"): ["kronops", "composite", "naive (torch.kron)"],
        ("KronALinear", "forward+backward", "8x16->16"): [
            "kronops", "naive (torch.kron)", "nn.Linear (base only)", "PEFT LoKr", "PEFT LoRA r=1"],
        ("sparse_linear[rows]", "backward", "8x32->24 rows 6/24"): [
            "kronops", "composite", "naive (full FT, masked)", "full fine-tuning"],
        ("InPlaceAdamW", "step", "24x32 rows 6/24"): [
            "kronops", "torch AdamW on a delta", "naive (full AdamW, masked grad)"],
        ("LLaMA step", "train step", "LLaMA h256 L4 8/2 heads, 4x128 tokens, 10% selected"): [
            "kronops S²FT in-place", "kronops S²FT adapter", "naive (full fine-tuning)"],
    }
    rows = []
    for (op, mode, shape), names in providers.items():
        for i, name in enumerate(names):
            rows.append(dict(op=op, mode=mode, shape=shape, provider=name,
                             device="cuda" if roofline else "cpu",
                             kronops=name.startswith("kronops"), min_ms=1.25 + 100 * i,
                             median_ms=1.5 + 100 * i, speedup_vs_naive=0.3 * 10 ** i,
                             rel_error=None if "naive" in name else 1e-7,
                             overflow="naive" in name, error_ok="naive" not in name,
                             **({"roofline_pct": 20.0 + 40 * i} if roofline else {})))
    return rows


@pytest.mark.parametrize("roofline", [False, True])
def test_plot_shows_every_provider_with_values_unclipped(roofline):
    rows = [dict(r, p20_ms=r["min_ms"] + 0.1, p80_ms=r["median_ms"] + 0.1)
            for r in _rows_of_every_kind(roofline)]
    fig = figure(dict(device="CPU (test)", torch="t", triton="t", dtype="float32"), rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert len(axes) == 5  # a panel per case
    shown = [t.get_text().replace("\n", " ") for ax in axes for t in ax.get_yticklabels()]
    assert sorted(shown) == sorted([r["provider"] for r in rows] + ["roofline"] * 5 * roofline)
    for ax in axes:
        box = ax.get_window_extent(renderer)
        labels = [t for t in ax.texts if t.get_text()]  # the value on each bar and line
        assert len(labels) == len(ax.get_yticklabels())
        for t in labels:  # inside their panel: nothing clipped or spilling into the next
            extent = t.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, t.get_text()
        assert all(t.get_window_extent(renderer).x1 <= box.x0 for t in ax.get_yticklabels())
    assert any("overflow (baseline)" in t.get_text() for ax in axes for t in ax.texts)


class FakeMachine:
    """A deterministic clock and workload: the same function costs 3 ms at first and more
    as the (fake) load rises, +1.5% per call; its first calls are cold (slower)."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def clock(self):
        return self.now

    def work(self):
        self.calls += 1
        cost = 0.003 * (1 + self.now / 0.2)
        self.now += cost * (20 if self.calls <= 2 else 1)


def test_kernel_totals_name_what_a_provider_launches():
    from bench.kernel_totals import totals
    case = next(iter(kron_linear_cases(8, 16, 12, torch.float32, CPU, modes=("forward",))))
    t = totals(case.providers["naive (torch.kron)"], CPU)
    assert t["kernels"] >= 2 and t["ms"] > 0
    assert "aten::mm" in dict(t["top"]) and len(t["top"]) <= 3


def test_gpu_timing_reports_graph_replays_with_host_time_beside(monkeypatch):
    """GPU rows: the CUDA-graph replay figures, do_bench's host-inclusive median beside them;
    a provider whose capture is refused keeps its do_bench figures, marked."""
    import triton.testing

    def do_bench(fn, warmup, rep, quantiles):
        return [2.0, 1.9, 2.2, 1.8]

    def do_bench_cudagraph(fn, rep, quantiles):
        if fn() == "syncs":
            raise RuntimeError("operation not permitted when stream is capturing")
        return [1.5, 1.4, 1.6, 1.3]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", do_bench_cudagraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    t = gpu_timing(lambda: "captures")
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.min_ms, t.host_ms, t.cuda_graph) == \
        (1.5, 1.4, 1.6, 1.3, 2.0, True)
    t = gpu_timing(lambda: "syncs")
    assert (t.median_ms, t.min_ms, t.host_ms, t.cuda_graph) == (2.0, 1.8, 2.0, False)
    times = time_providers({"a": lambda: "captures"}, torch.device("cuda"))
    assert times["a"].cuda_graph and times["a"].host_ms == 2.0
    case = next(iter(kron_linear_cases(4, 16, 12, torch.float32, CPU, modes=("forward",))))
    row = run_case(case, torch.float32, CPU, budget_s=FAST)[0]
    text = table([dict(row, host_ms=2.0, cuda_graph=True), dict(row, host_ms=2.0,
                                                                 cuda_graph=False)])
    assert "host ms" in text and "2.000*" in text.splitlines()[3]


def test_cpu_timing_interleaves_providers_under_drifting_load():
    """One function registered as two providers: equal medians even as the load drifts,
    where timing one provider after the other gives the later one a worse time."""
    machine = FakeMachine()
    timings = time_providers({"a": machine.work, "b": machine.work}, CPU, budget_s=0.3,
                             clock=machine.clock)
    a, b = timings["a"], timings["b"]
    assert a.calls == b.calls >= 10
    assert a.median_ms / b.median_ms == pytest.approx(1.0, abs=0.05)
    # The check has teeth: the same workload timed provider after provider is far off.
    machine, sequential = FakeMachine(), {}
    for name in "ab":
        machine.work()
        times = []
        for _ in range(a.calls):
            start = machine.clock()
            machine.work()
            times.append(machine.clock() - start)
        sequential[name] = sorted(times)[len(times) // 2]
    assert sequential["b"] / sequential["a"] > 1.2


def test_cpu_timing_gives_no_provider_a_fixed_predecessor():
    """Four equal 1 ms providers and one that leaves the next call 0.5 ms slower (a cache or
    thread state it leaves behind): every equal provider runs after it in some rounds only,
    so their medians agree. A rotated order put the same provider after it in
    every round: that one's median was 1.5 ms."""
    now, dirty = [0.0], [False]

    def call(cost, leaves_dirty=False):
        def run():
            now[0] += cost + (0.0005 if dirty[0] else 0.0)
            dirty[0] = leaves_dirty
        return run

    fns = {name: call(0.001) for name in "abcd"} | {"dirty": call(0.002, leaves_dirty=True)}
    timings = time_providers(fns, CPU, budget_s=0.5, clock=lambda: now[0])
    assert {round(timings[name].median_ms, 6) for name in "abcd"} == {1.0}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_timing_keeps_a_settings_cost_out_of_every_provider():
    """A provider's setting (a context such as kronops.native.disabled) is entered and left
    outside its timed call, and the call after it is repeated untimed: here entering and
    leaving cost 5 ms each and leave the next call 2 ms slower, yet every provider is timed
    at its own 1 ms (2 ms for the slow one). Timing the setting inside the call, as before,
    gives 11 ms and 3 ms."""
    now, dirty = [0.0], [False]

    def call(cost):
        def run():
            now[0] += cost + (0.002 if dirty[0] else 0.0)
            dirty[0] = False
        return run

    @contextlib.contextmanager
    def setting():
        now[0] += 0.005
        yield
        now[0] += 0.005
        dirty[0] = True

    fns = {"plain": call(0.001), "set": call(0.001), "slow": call(0.002)}
    timings = time_providers(fns, CPU, budget_s=1.0, clock=lambda: now[0],
                             settings={"set": setting})
    assert {name: round(t.median_ms, 6) for name, t in timings.items()} == \
        {"plain": 1.0, "set": 1.0, "slow": 2.0}

    def inside():
        with setting():
            fns["set"]()
    naive = time_providers({**fns, "set": inside}, CPU, budget_s=1.0, clock=lambda: now[0])
    assert naive["set"].median_ms == pytest.approx(11.0) and naive["slow"].median_ms > 2.0


def test_cpu_timing_same_function_twice_real_clock(one_thread):
    """Real clock, a deterministic ~1 ms matmul chain registered twice: the best times agree
    within 5%. The minimum over 100+ interleaved calls is what load cannot inflate on both
    alike; medians move with the load. An attempt can still lose to a burst of load, so
    three are allowed: a timer that treats the two providers differently fails all three."""
    m = torch.randn(256, 256)

    def chain():
        return m @ m @ m @ m

    ratios = []
    for _ in range(3):
        timings = time_providers({"a": chain, "b": chain}, CPU, budget_s=0.0, min_rounds=120)
        ratios.append(timings["a"].min_ms / timings["b"].min_ms)
        if abs(ratios[-1] - 1) <= 0.05:
            break
    assert abs(ratios[-1] - 1) <= 0.05, ratios


def test_peft_lokr_computes_the_same_layer():
    pytest.importorskip("peft")
    rows = []
    for case in krona_layer_cases(8, 16, 16, torch.float32, CPU):
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    by_name = {r["provider"]: r for r in rows}
    assert by_name["PEFT LoKr"]["rel_error"] < 1e-5 and by_name["PEFT LoKr"]["error_ok"]
    assert any(name.startswith("PEFT LoRA") for name in by_name)


def test_lycoris_lokr_computes_the_same_layer():
    pytest.importorskip("lycoris")
    rows = []
    for case in krona_layer_cases(8, 16, 16, torch.float32, CPU):
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    lycoris = {r["provider"]: r for r in rows}["LyCORIS LoKr (bypass)"]
    assert lycoris["rel_error"] < 1e-5 and lycoris["error_ok"]


def test_s2ft_cases_are_checked():
    rows = []
    for case in [*sparse_linear_cases(8, 32, 24, 0.25, "rows", torch.float32, CPU),
                 *sparse_linear_cases(8, 32, 24, 0.25, "cols", torch.float32, CPU),
                 *inplace_adamw_cases(16, 32, 0.25, torch.float32, CPU)]:
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    checked = [r for r in rows if r["rel_error"] is not None]
    # kronops (and its two pinned routes), composite, naive; three modes; rows and cols
    assert len(checked) == 5 * 3 * 2 + 3 and all(r["error_ok"] for r in checked)
    assert {r["provider"] for r in checked} >= {"kronops (merged weight)", "kronops (Δ products)"}


TINY_SERVING = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=40)


def test_serving_cases_are_checked():
    """Every mixed-batch provider but the floor is checked against fp64 (PEFT's
    ``adapter_names=`` included: it is a baseline, marked when wrong); switches are timed."""
    pytest.importorskip("transformers")
    rows = []
    for case in serving_cases(TINY_SERVING, 4, 3, (1, 3), torch.float32, CPU):
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    mixed = [r for r in rows if r["mode"] == "mixed batch"]
    kronops_rows = [r for r in mixed if r["kronops"]]
    assert len(kronops_rows) == 3 and all(r["error_ok"] for r in kronops_rows)
    naive = [r for r in mixed if r["provider"].startswith("naive")]
    assert len(naive) == 3 and all(r["error_ok"] for r in naive)
    assert all(r["rel_error"] is None for r in mixed if "floor" in r["provider"])
    assert {r["provider"] for r in rows if r["mode"] == "merge"} >= {
        "kronops bank.merge, S²FT (switch)", "kronops bank.merge, KronA (switch)"}


def test_sparse_linear_rows_have_a_lora_baseline_of_similar_size():
    """Beside sparse_linear: PEFT LoRA with the rank whose trainable size is closest to Δ's."""
    pytest.importorskip("peft")
    case = next(iter(sparse_linear_cases(4, 64, 32, 0.25, "rows", torch.float32, CPU,
                                         modes=("forward",))))
    (lora,) = [name for name in case.providers if name.startswith("PEFT LoRA")]
    assert lora == "PEFT LoRA r=5" and lora in case.unchecked  # Δ 8x64 = 512 ~ 5 * (64 + 32)
    assert case.providers[lora](0).shape == (4, 32)


def test_markdown_table_has_a_row_per_result():
    rows = _rows_of_every_kind(roofline=True)
    text = markdown(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| op | mode | shape | provider | median ms | min ms | % roofline")
    assert len(lines) == 2 + len(rows) and all(line.count("|") == lines[0].count("|")
                                               for line in lines)


def test_curvature_cases_are_checked():
    """kfac_collect: the factors checked against fp64, the training step (the floor) timed
    only; ewc_penalty: every provider's penalty and gradient checked against fp64."""
    pytest.importorskip("transformers")
    rows = []
    for case in [*kfac_collect_cases(TINY_SERVING, 1, 4, torch.float32, CPU),
                 *ewc_penalty_cases(TINY_SERVING, 1, 4, torch.float32, CPU)]:
        rows += run_case(case, torch.float32, CPU, budget_s=FAST)
    by_name = {(r["op"], r["provider"]): r for r in rows}
    assert by_name["kfac_collect", "kronops collect"]["error_ok"]
    assert by_name["kfac_collect", "kronops collect"]["rel_error"] is not None
    assert by_name["kfac_collect", "naive (plain training step)"]["rel_error"] is None
    assert {r["mode"] for r in rows if r["op"] == "kfac_collect"} == {"one batch",
                                                                      "one batch, every=2"}
    assert all(r["error_ok"] for r in rows
               if r["op"] == "kfac_collect" and r["provider"] == "kronops collect")
    penalty = [r for r in rows if r["op"] == "ewc_penalty"]
    expected = {"kronops", "composite (plain PyTorch)"}
    if load_curvlinops()[0] is not None:
        expected.add("curvlinops KFACLinearOperator")
    if load_nngeometry()[0] is not None:
        expected.add("nngeometry PMatKFAC")
    assert {r["provider"] for r in penalty} == expected
    assert all(r["rel_error"] is not None and r["error_ok"] for r in penalty)
