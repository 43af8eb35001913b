"""The dispatch rules' sweep: both paths of each rule of ``kronops/kron/dispatch.py`` timed
at points on either side of its threshold, in rows that ``bench.propose_thresholds`` turns
into the thresholds.

    python -m bench.dispatch_sweep [--tiny] [--rules NAMES] [--out FILE] [--budget S]

Each point is one benchmark case (checked against fp64, timed as ``python -m bench`` times:
CUDA-graph replays on a GPU, interleaved rounds on CPU) with the two paths the rule chooses
between pinned by ``dispatch.override``; its rows carry the rule and the point's score:

- ``persistent``  kron_linear forward, factors that fit one tile: persistent kernel or row
                  blocks (``persistent_forward``);
- ``one_pass``    kron_linear backward: one pass over x and dY or the three kernels
                  (``one_pass_backward``);
- ``materialise`` kron_linear forward+backward: s·kron(A, B) and one GEMM, or fused, by the
                  weight's intensity in·out/(in+out) (``MATERIALISE_MAX_INTENSITY``) and size
                  (``MATERIALISE_MAX_ELEMENTS``);
- ``merge``       a KronALinear training step: merged weight or the separate adapter summed
                  into its base, by tokens per unit of intensity (``MERGE_TOKEN_FACTOR``);
- ``sparse_merge`` S²FT's sparse_linear, forward+backward, rows mode: merged weight or the
                  op's Δ products, by selected tokens (tokens × fraction) per unit of
                  intensity (``SPARSE_MERGE_TOKEN_FACTOR``);
- ``group``       kron_matmul, three factors: two fused groups or mode by mode, by the larger
                  group's elements (``GROUP_MAX_ELEMENTS``).

The merge rules merge fp32 and fp64 only (a bf16 W' rounds small updates away), so their
points run in fp32 whatever ``--dtype`` says. The default set is the GPU's (16384 rows,
bf16, CUDA); ``--tiny`` runs every rule at tiny
shapes on CPU's own kernels (a rehearsal of the plumbing: the persistent and one-pass
choices exist only in the CUDA launchers, so both of their paths run the same CPU kernel).
The JSON is rewritten after every point, with the configs the autotuner chose
(``kronops.kernels.launch.tuning_choices``).
"""
import argparse
import dataclasses
import datetime
import functools
import math
import sys

import torch
from torch import nn

import kronops
from kronops.kernels.launch import tuning_choices
from kronops.kernels.kron.rows_grads import fits as one_pass_fits
from kronops.kernels.kron.rows_persistent import fits as persistent_fits
from kronops.kron import dispatch
from kronops.kron.modules import factor_shapes
from kronops.testing import naive_kron_linear, naive_kron_matmul

from .__main__ import DTYPES
from .cases import Provider, build_case, input_sets
from .kron_cases import kron_flops, pinned
from .s2ft_linear_cases import sparse_linear_cases
from .report import environment, write_json
from .runner import run_case

RULES = ("persistent", "one_pass", "materialise", "merge", "sparse_merge", "group")
MERGED_DTYPE = torch.float32  # the merge rules' points (they merge fp32 and fp64 only)
# What every path pins besides its own rule: the fused paths, as the tests run them, so that
# a point times the one choice its rule makes (a tiny kron_linear would otherwise materialise).
FUSED = dict(materialise=False, merge=False, group=False)
# Per rule, the points of the GPU set and of the tiny set: (in, out) for the kron_linear
# rules, (in, out, tokens) for merge, factor shapes for group.
FULL = dict(
    rows=16384,
    persistent=[(4096, 4096), (1024, 1024), (256, 256)],
    one_pass=[(4096, 4096), (1024, 1024), (384, 1536), (256, 256)],
    materialise=[(256, 1024), (384, 1536), (512, 1536), (768, 768), (1024, 1024), (1024, 2048),
                 (2048, 2048), (384, 11008)],
    merge=[(1024, 1024, t) for t in (64, 128, 256, 512, 1024, 2048)]
    + [(4096, 4096, t) for t in (256, 512, 1024, 2048, 4096, 8192)],
    sparse_merge=[(k, k, 0.05, t) for k in (1024, 4096) for t in (256, 1024, 4096, 16384)],
    group=[[(8, 8)] * 3, [(8, 8), (16, 16), (16, 16)], [(16, 16)] * 3],
)
TINY = dict(
    rows=8,
    persistent=[(16, 16)],
    one_pass=[(12, 20)],
    materialise=[(16, 16)],
    merge=[(16, 16, 4), (16, 16, 32)],
    sparse_merge=[(16, 16, 0.25, 4), (16, 16, 0.25, 32)],
    group=[[(2, 3), (3, 2), (2, 2)]],
)


def _kron_point(rule, rows, k, n, mode, paths, dtype, device):
    """kron_linear at (k -> n), factors near the square roots, one provider per pinned path."""
    (a1, a2), (b1, b2) = factor_shapes(k, n)
    sets = input_sets([(rows, k), (a1, a2), (b1, b2)], dtype, device, True)
    providers = {name: Provider(pinned(kronops.kron_linear, **dict(FUSED, **pins)))
                 for name, pins in paths.items()}
    shape = f"{rows}x{k}->{n} A{a1}x{a2} B{b1}x{b2}"
    elt = torch.finfo(dtype).bits // 8
    case = build_case("kron_linear", mode, shape, rows * k, rows * (k + n) * elt,
                      kron_flops(rows, a1, a2, b1, b2), providers, naive_kron_linear, sets[0], sets)
    return dict(rule=rule, in_features=k, out_features=n, tokens=rows,
                intensity=dispatch.intensity(k, n), elements=k * n), case


# The kron_linear rules: the mode timed, which factors the rule applies to (None: all) and
# its two paths.
KRON_RULES = {
    "persistent": ("forward", persistent_fits, {"persistent": dict(persistent=True),
                                                "row blocks": dict(persistent=False)}),
    "one_pass": ("backward", one_pass_fits, {"one pass": dict(one_pass=True),
                                             "three kernels": dict(one_pass=False)}),
    "materialise": ("forward+backward", None, {"materialised": dict(materialise=True),
                                               "fused": dict(materialise=False)}),
}


def kron_points(rule, spec, dtype, device):
    """``rule``'s kron_linear points of ``spec`` whose factors it applies to."""
    mode, fits, paths = KRON_RULES[rule]
    for k, n in spec[rule]:
        (a1, a2), (b1, b2) = factor_shapes(k, n)
        if fits is None or fits(a1, a2, b1, b2, dtype):
            yield _kron_point(rule, spec["rows"], k, n, mode, paths, dtype, device)


def merge_points(spec, dtype, device):
    """A KronALinear step (frozen base) at ``tokens`` rows, in fp32: merged weight or separate
    adapter (``dtype`` unused: MERGED_DTYPE)."""
    dtype = MERGED_DTYPE
    for k, n, tokens in spec["merge"]:
        base = nn.Linear(k, n, device=device, dtype=dtype).requires_grad_(False)
        layer = kronops.KronALinear(base)
        nn.init.normal_(layer.b, std=0.02)
        params = [layer.a, layer.b]
        sets = input_sets([(tokens, k)], dtype, device, True)
        w, bias = base.weight.detach(), base.bias.detach()

        def reference(x, a, b, w=w, bias=bias, scale=layer.scale):
            return (nn.functional.linear(x, w.double(), bias.double())
                    + scale * naive_kron_linear(x, a, b))

        providers = {"merged": Provider(pinned(layer, **dict(FUSED, merge=True)), params),
                     "separate": Provider(pinned(layer, **FUSED), params)}
        (a1, a2), (b1, b2) = layer.a.shape, layer.b.shape
        elt = torch.finfo(dtype).bits // 8
        case = build_case("KronALinear", "forward+backward", f"{tokens}x{k}->{n}", tokens * k,
                          (tokens * (k + n) + k * n) * elt,
                          2 * tokens * k * n + kron_flops(tokens, a1, a2, b1, b2), providers,
                          reference, [sets[0][0], *params], sets)
        intensity = dispatch.intensity(k, n)
        yield dict(rule="merge", in_features=k, out_features=n, tokens=tokens,
                   intensity=intensity, tokens_per_intensity=tokens / intensity), case


def sparse_merge_points(spec, dtype, device):
    """sparse_linear, rows mode, ``fraction`` of the rows, at ``tokens`` rows, in fp32: its
    merged weight and its Δ products (the bench's case, those two providers; ``dtype``
    unused: MERGED_DTYPE)."""
    paths = {"kronops (merged weight)": "merged", "kronops (Δ products)": "Δ products"}
    for k, n, fraction, tokens in spec["sparse_merge"]:
        (case,) = sparse_linear_cases(tokens, k, n, fraction, "rows", MERGED_DTYPE, device,
                                      modes=("forward+backward",))
        case = dataclasses.replace(
            case, unchecked=set(),
            providers={paths[n]: p for n, p in case.providers.items() if n in paths},
            settings={paths[n]: s for n, s in case.settings.items() if n in paths})
        intensity = dispatch.intensity(k, n)
        yield dict(rule="sparse_merge", in_features=k, out_features=n, tokens=tokens,
                   fraction=fraction, intensity=intensity,
                   selected_tokens_per_intensity=tokens * fraction / intensity), case


def group_points(spec, dtype, device):
    """kron_matmul with three factors: grouped at the cheapest split, or mode by mode."""
    rows = spec["rows"]
    for shapes in spec["group"]:
        k, n = math.prod(q for _, q in shapes), math.prod(p for p, _ in shapes)
        sets = input_sets([(rows, k), *shapes], dtype, device, True)
        paths = {"grouped": dict(group=True), "mode by mode": dict(group=False)}
        providers = {name: Provider(pinned(lambda x, *f: kronops.kron_matmul(x, f),
                                           **dict(FUSED, **pins)))
                     for name, pins in paths.items()}
        with dispatch.override(group=True):  # the split the grouped path takes
            split = dispatch.factor_split("cuda", shapes)
        groups = [shapes[:split], shapes[split:]]
        largest = max(math.prod(p * q for p, q in g) for g in groups)
        elt = torch.finfo(dtype).bits // 8
        case = build_case("kron_matmul[3]", "forward+backward",
                          f"{rows}x{k}->{n} " + "(x)".join(f"{p}x{q}" for p, q in shapes),
                          rows * k, rows * (k + n) * elt, 0, providers,
                          lambda x, *f: naive_kron_matmul(x, f), sets[0], sets)
        yield dict(rule="group", factors=[list(s) for s in shapes], tokens=rows,
                   group_elements=largest), case


POINTS = {**{rule: functools.partial(kron_points, rule) for rule in KRON_RULES},
          "merge": merge_points, "sparse_merge": sparse_merge_points, "group": group_points}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dispatch_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (a rehearsal)")
    p.add_argument("--rules", default=",".join(RULES),
                   help=f"comma-separated, of {', '.join(RULES)}")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default: bfloat16 on the GPU set, float32 with --tiny")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--budget", type=float, default=0.05, help="CPU timing budget per point (s)")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        p.error(f"--rules: unknown {', '.join(unknown)}; valid: {', '.join(RULES)}")
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dispatch_sweep: no CUDA GPU here; --tiny runs the CPU rehearsal", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("float32" if args.tiny else "bfloat16")]
    torch.backends.cuda.matmul.allow_tf32 = False
    spec = TINY if args.tiny else FULL
    meta = dict(environment(device), dtype=str(dtype).removeprefix("torch."), tiny=args.tiny,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                thresholds=current_thresholds(), complete=False)
    rows = []
    for rule in rules:
        for point, case in POINTS[rule](spec, dtype, device):
            for row in run_case(case, dtype, device, budget_s=args.budget):
                rows.append(dict(point, **row))
            meta["autotuned"] = tuning_choices()
            write_json(args.out, meta, rows)
            print(f"{rule} | {case.shape} | " + " | ".join(
                f"{r['provider']} {r['median_ms']:.4f} ms" for r in rows[-len(case.providers):]),
                flush=True)
    meta["complete"] = True
    write_json(args.out, meta, rows)
    return 0


def current_thresholds() -> dict:
    """The thresholds as dispatch.py sets them now (beside what the sweep proposes)."""
    return dict(MATERIALISE_MAX_INTENSITY=dispatch.MATERIALISE_MAX_INTENSITY,
                MATERIALISE_MAX_ELEMENTS=dispatch.MATERIALISE_MAX_ELEMENTS,
                MERGE_TOKEN_FACTOR=dispatch.MERGE_TOKEN_FACTOR,
                SPARSE_MERGE_TOKEN_FACTOR=dispatch.SPARSE_MERGE_TOKEN_FACTOR,
                GROUP_MAX_ELEMENTS=dispatch.GROUP_MAX_ELEMENTS)


if __name__ == "__main__":
    sys.exit(main())
