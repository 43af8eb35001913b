"""Launching the kernels: tuning configs pruned by a register budget, then autotuned.

On a GPU the viable configs are autotuned once per key; under ``TRITON_INTERPRET=1``, or
with ``KRONOPS_AUTOTUNE=0``, the first viable config runs, so CPU tests run each kernel once
(and a GPU test run compiles one config per key). The ahead-of-time compile
check (``kronops.kernels.aot``) walks the same configs, so every config that can be
launched is also compiled in CI.
"""
import os
from dataclasses import dataclass, field

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning() -> bool:
    """Whether a launch benchmarks its viable configs: on a GPU, unless ``KRONOPS_AUTOTUNE=0``
    (read at each launch)."""
    return not interpreting() and os.environ.get("KRONOPS_AUTOTUNE", "1") != "0"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: tf32 for fp32 only when torch allows it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block(n: int, lo: int = 16, hi: int = 64) -> int:
    """Power-of-two tile length covering ``n``, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def num_programs_cap(device: torch.device) -> int:
    """How many programs a persistent reduction grid uses: a few per SM, 8 on CPU."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


# Register budget: 4-byte words of live tiles a thread may hold before the compiler
# spills (checked against the compiled kernels by kronops.kernels.aot).
REGISTER_BUDGET = 72


def live_words(accumulators: int, operands: int, element_bytes: int, precision: str) -> int:
    """4-byte words one program keeps live: fp32 accumulators plus its operand tiles.

    ieee fp32 dots run on the FMA units, which hold their operands twice over.
    """
    operand_bytes = element_bytes * (2 if precision == "ieee" else 1)
    return accumulators + operands * operand_bytes // 4


def tile_words(accumulators: int, operands: int, loaded: int, element_bytes: int,
               precision: str) -> int:
    """4-byte words one program keeps live in registers: its fp32 ``accumulators``, the
    ``loaded`` elements it holds beside them (an epilogue's output tile) and, for fp32 dots,
    the dot ``operands`` (see ``live_words``). fp16/bf16 tensor-core dots stage their
    operands in shared memory: not counted. fp32 operands are: ieee dots run on the FMA units,
    and tf32 tiles counted as bf16 ones compiled to 240-255 registers on sm_80/sm_90."""
    operands = operands if element_bytes == 4 else 0
    return live_words(accumulators, operands + loaded, element_bytes, precision)


def viable_configs(configs: list, footprint, constexprs: dict, element_bytes: int) -> list:
    """The configs whose live tiles fit the register budget (else the one closest to it).

    ``footprint(config, constexprs, element_bytes)`` counts the 4-byte words one program
    keeps live (see ``live_words``).
    """
    def per_thread(c):
        return footprint(c, constexprs, element_bytes) / (32 * c.num_warps)
    fits = [c for c in configs if per_thread(c) <= REGISTER_BUDGET]
    return fits or [min(configs, key=per_thread)]


def autotuned(fn, configs: list, key: list, footprint, restore_value=()):
    """``fn`` (a ``@triton.jit`` kernel) under ``triton.autotune``, pruned per launch to the
    viable configs for its constexprs and element size; launch it as ``kernel[grid](...)``.

    On a GPU the viable configs are benchmarked once per ``key``; under the interpreter or
    ``KRONOPS_AUTOTUNE=0`` the first one runs (one config: no benchmark). A kernel that updates tensors in place names
    their pointer arguments in ``restore_value``: benchmarking runs it many times.
    """
    def prune(configs, named_args, **constexprs):
        element_bytes = next(iter(named_args.values())).element_size()
        fits = viable_configs(configs, footprint, constexprs, element_bytes)
        return fits if autotuning() else fits[:1]

    tuned = triton.autotune(configs=configs, key=key, restore_value=list(restore_value),
                            prune_configs_by={"early_config_prune": prune})(fn)
    TUNED.append(tuned)
    return tuned


TUNED = []  # every kernel ``autotuned`` made, in import order


def tuning_choices() -> dict:
    """{kernel name: {tuning key: the config chosen}} of every autotuned kernel that has
    chosen (on a GPU; the interpreter never benchmarks): what the benchmarks ran."""
    return {t.fn.__name__: {str(key): str(config) for key, config in t.cache.items()}
            for t in TUNED if t.cache}


# Ahead-of-time compile cases: (element type, tl.dot input_precision) as launches produce
# them (fp32 runs as tf32 or, torch's default, ieee), and each element's size.
PRECISIONS = [("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")]
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Rows (tokens) of a compiled launch: the benchmark's 16384, a multiple of 16 as batch x
# sequence usually is.
TOKENS = 16384


@dataclass(frozen=True)
class CompileCase:
    """One launch for the ahead-of-time compile check (``kronops.kernels.aot``), declared
    beside its kernel: ``ints`` the values of its integer arguments (sizes, strides), which
    the compile specialises as the launcher does (1 a constant, multiples of 16 divisible;
    an integer without a value is compiled unspecialised); ``pointer_types`` the pointer
    arguments not of the element type; ``configs`` the tuning configs viable for these
    constexprs."""
    name: str
    kernel: object
    constexprs: dict
    element: str
    configs: list
    ints: dict = field(default_factory=dict)
    pointer_types: dict = field(default_factory=dict)
