"""Kernel totals: what each provider of the benchmark's cases launches, and for how long.

``python -m bench.kernel_totals [--full | --tiny] [--ops NAMES] [--out FILE]`` runs each provider a
few times under the profiler (after one untimed call) and prints, per case and provider,
kernels per call, their total time per call and the three longest kernels. On a GPU the
times are the kernels' own (device time, no host work): beside the benchmark's timings they
show how much of a call is host overhead. On CPU the "kernels" are the ATen ops that would
each be a launch on a GPU (``bench.overhead``), timed by their own CPU time.
"""
import argparse
import sys
from collections import defaultdict

import torch

from .__main__ import DTYPES
from .cases import INPUT_SETS
from .overhead import launches
from .report import environment, write_json
from .suite import default_cases, resolve_ops, tiny_cases

CALLS = 3


def kernel_time_us(event, device: torch.device) -> float:
    """A launch event's own time in microseconds (device time on a GPU)."""
    return event.time_range.elapsed_us() if device.type == "cuda" else event.self_cpu_time_total


def totals(run, device: torch.device, calls: int = CALLS) -> dict:
    """{"kernels": launches per call, "ms": their time per call, "top": the three longest
    [name, ms per call]} over ``calls`` calls of ``run(i)`` (one untimed call first)."""
    run(0)
    found = launches(lambda: [run(i % INPUT_SETS) for i in range(calls)], device)
    by_name = defaultdict(float)
    for event in found:
        by_name[event.name] += kernel_time_us(event, device) / calls / 1e3
    top = sorted(by_name.items(), key=lambda item: -item[1])[:3]
    return dict(kernels=len(found) / calls, ms=sum(by_name.values()), top=top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_totals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the GPU shape set")
    p.add_argument("--tiny", action="store_true", help="the GPU set's families at tiny shapes, on CPU")
    p.add_argument("--ops", default=None, help="families or op names, comma-separated")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.full else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.full else "float32")]
    ops = resolve_ops(args.ops.split(",")) if args.ops else None
    rows, meta = [], dict(environment(device), dtype=str(dtype))
    cases = (tiny_cases(dtype, device, ops) if args.tiny
             else default_cases(args.full, dtype, device, ops=ops))
    for case in cases:
        if ops is not None and case.op not in ops:
            continue
        for provider, run in case.providers.items():
            t = totals(run, device)
            rows.append(dict(op=case.op, mode=case.mode, shape=case.shape, provider=provider, **t))
            top = "; ".join(f"{name[:48]} {ms:.3f}" for name, ms in t["top"])
            print(f"{case.op} | {case.mode} | {case.shape} | {provider}: {t['kernels']:.0f} "
                  f"kernels, {t['ms']:.3f} ms/call | {top}", flush=True)
            if args.out:  # rewritten after every row: a run cut short keeps its rows
                write_json(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
