"""``python -m bench``: run the benchmark suite, print the table, write JSON and PNG.

Exits non-zero when any provider's result is out of tolerance against fp64.
"""
import argparse
import datetime
import os
import sys

import torch

from . import overhead
from .peft_providers import peft_version
from .s2ft_model_cases import transformers_available
from .report import environment, plot, table, write_json
from .runner import run_case
from .suite import default_cases
from .timing import copy_bandwidth, gemm_rate

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--full", action="store_true", help="GPU-sized shapes (LLaMA/MiniLM, 16k rows)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda with --full, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ops", default=None, help="comma-separated op names to keep (e.g. kron_linear)")
    p.add_argument("--out", default=None, help="results JSON path (PNG written beside it)")
    return p.parse_args(argv)


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
    if not transformers_available():
        print("bench: transformers is not installed; the LLaMA training-step rows are skipped",
              file=sys.stderr)
    if meta["peft"] is None:
        print("bench: peft is not installed; the PEFT LoKr/LoRA rows are skipped "
              "(pip install peft to include them)", file=sys.stderr)
    meta.update(dtype=str(dtype).removeprefix("torch."), full=args.full,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    ceilings = None
    if device.type == "cuda":
        ceilings = dict(copy_gbps=copy_bandwidth(device), gemm_tflops=gemm_rate(device, dtype))
        meta["ceilings"] = ceilings
    ops = set(args.ops.split(",")) if args.ops else None
    cases = [c for c in default_cases(args.full, dtype, device) if ops is None or c.op in ops]
    if not cases:
        print(f"bench: no case matches --ops {args.ops}", file=sys.stderr)
        return 2
    rows = []
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        rows += run_case(case, dtype, device, ceilings)
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']}"
          + (f" | copy {ceilings['copy_gbps']:.0f} GB/s, GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s"
             if ceilings else ""))
    print(table(rows))
    meta["host_overhead"] = overhead.measure(device)
    print(f"host overhead per call at tiny shapes ({device.type}, fp32):\n"
          f"{overhead.table(meta['host_overhead'])}")
    out = args.out or os.path.join(RESULTS, f"{device.type}{'-full' if args.full else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, meta, rows)
    plot(os.path.splitext(out)[0] + ".png", meta, rows)
    print(f"wrote {out} and {os.path.splitext(out)[0]}.png")
    failed = [r for r in rows if not r["error_ok"]]
    if failed:
        print(f"bench: {len(failed)} result(s) out of tolerance vs fp64 (marked FAIL)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
