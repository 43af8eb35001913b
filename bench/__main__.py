"""``python -m bench``: run the benchmark suite, print the table, write the JSON and one PNG per op family.

Exits 1 when a kronops provider's result is out of tolerance against fp64 (a baseline's
is only marked), 2 on a usage error.
"""
import argparse
import datetime
import os
import sys
import textwrap

import torch

from kronops.kernels.launch import tuning_choices

from . import overhead
from .optional import load_vllm, optional_import, skipped
from .lycoris_provider import lycoris_version
from .peft_providers import peft_version
from .report import environment, plot, table, write_json
from .runner import failures, run_case
from .suite import FAMILIES, OPS, default_cases, resolve_ops, tiny_cases, valid_op_names
from .timing import CPU_BUDGET_S, CPU_REGIMES, copy_bandwidth, gemm_rate, set_cpu_regime

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS = os.path.join(os.path.dirname(__file__), "results")
# Where a run writes without --out: untracked (see .gitignore), so that a local run never
# overwrites the published results in RESULTS.
LOCAL_RESULTS = os.path.join(RESULTS, "local")

DESCRIPTION = """\
Run the kronops benchmark suite: each op's providers (kronops, the PyTorch composite path,
the naive reference, PEFT, full fine-tuning, ...) checked against fp64 and timed. Prints a
table and writes a JSON results file and a PNG figure per op family.

Exit status: 0; 1 if a kronops provider's result is out of tolerance (baselines that
overflow or are out of tolerance, as in float16, are marked "(baseline)" and do not count);
2 on a usage error (an unknown --ops name, --full or --device cuda without a GPU)."""


def _epilog() -> str:
    lines = ["--ops accepts these names (comma-separated or repeated; case does not matter,",
             "and '-' or ' ' may stand for '_'):", "  families:"]
    width = max(map(len, FAMILIES))
    lines += [f"    {name:<{width}}  {', '.join(ops)}" for name, ops in FAMILIES.items()]
    lines.append("  op names, as in the table's op column:")
    lines += textwrap.wrap(", ".join(op if " " not in op else f"'{op}'" for op in OPS), 76,
                           initial_indent="    ", subsequent_indent="    ")
    lines += ["", "Without --out, results go to bench/results/local/<device>[-full|-tiny].json",
              "(untracked); --out bench/results/cpu.json updates the published CPU results."]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION, epilog=_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="GPU-sized shapes (LLaMA/MiniLM, 16k rows)")
    p.add_argument("--tiny", action="store_true",
                   help="the --full set's families at tiny shapes, on CPU unless --device says "
                        "otherwise (a rehearsal of the GPU run's plumbing: seconds)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --full, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ops", action="append", default=None, metavar="NAMES",
                   help="keep only these ops: families or op names, comma-separated (listed below)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="results JSON path, the PNG figures written beside it "
                        "(default: bench/results/local/<device>[-full|-tiny].json)")
    p.add_argument("--budget", type=float, default=CPU_BUDGET_S, metavar="SECONDS",
                   help=f"CPU: timing budget per case (default {CPU_BUDGET_S:g}); the providers "
                        "are timed in interleaved rounds until their spread is small or it is spent")
    p.add_argument("--cpu-regime", choices=CPU_REGIMES, default="default",
                   help="CPU: the allocator regime (default: glibc's malloc as it is, large "
                        "outputs page-faulting on every call; warm: freed memory reused warm, "
                        "as a long-running process sees it)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the host-overhead rows (tiny shapes, every op) after the table")
    args = p.parse_args(argv)
    if args.full and args.tiny:
        p.error("--full and --tiny exclude each other")
    args.op_names = None
    if args.ops is not None:
        names = [n.strip() for arg in args.ops for n in arg.split(",") if n.strip()]
        if not names:
            p.error(f"--ops: no name given; valid names: {', '.join(valid_op_names())}")
        try:
            args.op_names = resolve_ops(names)
        except ValueError as e:
            p.error(f"--ops: {e}; valid names: {', '.join(valid_op_names())}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if args.full else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: no CUDA GPU is available here; --full and --device cuda need one. "
              "Run `python -m bench` for the CPU set.", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    torch.backends.cuda.matmul.allow_tf32 = False
    from tqdm import tqdm

    meta = environment(device)
    meta["peft"] = peft_version()
    meta["lycoris"] = lycoris_version()
    vllm, _ = load_vllm()
    meta["vllm"] = None if vllm is None else vllm.__version__
    for line in skipped():
        print(f"bench: {line}", file=sys.stderr)
    meta.update(dtype=str(dtype).removeprefix("torch."), full=args.full, tiny=args.tiny,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cpu":
        set_cpu_regime(args.cpu_regime)
        meta.update(cpu_budget_s=args.budget, cpu_regime=args.cpu_regime)
    # The same run's copy and GEMM rates (in the run's dtype): each row's roofline and the
    # fraction of the GEMM rate it reaches. Not for fp16 on CPU, which has no fast fp16 GEMM
    # to be a ceiling (a 1024³ product takes seconds there).
    ceilings = None
    if device.type == "cuda" or dtype != torch.float16:
        ceilings = dict(copy_gbps=copy_bandwidth(device), gemm_tflops=gemm_rate(device, dtype))
        meta["ceilings"] = ceilings
    ops = args.op_names
    built = (tiny_cases(dtype, device, ops) if args.tiny
             else default_cases(args.full, dtype, device, ops=ops))
    cases = [c for c in built if ops is None or c.op in ops]
    if not cases:
        print(f"bench: no case of {', '.join(sorted(ops))} in this set "
              f"({'--full' if args.full else 'CPU'}; optional packages missing?)", file=sys.stderr)
        return 2
    kind = "-full" if args.full else "-tiny" if args.tiny else ""
    out = args.out or os.path.join(LOCAL_RESULTS, f"{device.type}{kind}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    rows = []
    meta["complete"] = False  # the JSON is rewritten after every case: a run cut short keeps its rows
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        rows += run_case(case, dtype, device, ceilings, budget_s=args.budget)
        meta["autotuned"] = tuning_choices()
        write_json(out, meta, rows)
    meta["complete"] = True
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']}"
          + (f" | copy {ceilings['copy_gbps']:.0f} GB/s, GEMM {ceilings['gemm_tflops']:.2f} TFLOP/s"
             if ceilings else "")
          + (f" | allocator {args.cpu_regime}" if device.type == "cpu" else ""))
    print(table(rows))
    if not args.no_overhead:
        meta["host_overhead"] = overhead.measure(device)
        print(f"host overhead per call at tiny shapes ({device.type}, fp32):\n"
              f"{overhead.table(meta['host_overhead'])}")
    write_json(out, meta, rows)
    matplotlib, why = optional_import("matplotlib")
    if matplotlib is None:  # the vLLM environment has none: draw them where it is installed
        written = f"{out}; no figures ({why}: python -m bench.report {out} --plot draws them)"
    else:
        written = f"{out} and {', '.join(plot(os.path.splitext(out)[0] + '.png', meta, rows))}"
    print(f"wrote {written}" + ("" if args.out else " (untracked; --out PATH writes elsewhere)"))
    baselines = [r for r in rows if not r["kronops"] and not r["error_ok"]]
    if baselines:
        print(f"bench: {len(baselines)} baseline result(s) overflow or are out of tolerance vs "
              f"fp64 (marked '(baseline)'; they do not fail the run)", file=sys.stderr)
    failed = failures(rows)
    if failed:
        print(f"bench: {len(failed)} kronops result(s) out of tolerance vs fp64 (marked FAIL)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
