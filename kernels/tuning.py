"""Launch a Triton kernel over a list of tuning configs.

On a GPU the configs are autotuned once per key; under ``TRITON_INTERPRET=1`` the first
config is used, so CPU tests run each kernel once. The ahead-of-time compile test walks
the same lists, so every config that can be launched is also compiled in CI.
"""
import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
# spills (checked against the compiled kernels by tests/test_aot_compile.py).
REGISTER_BUDGET = 72


def live_words(accumulators: int, operands: int, element_bytes: int, precision: str) -> int:
    """4-byte words one program keeps live: fp32 accumulators plus its operand tiles.

    ieee fp32 dots run on the FMA units, which hold their operands twice over.
    """
    operand_bytes = element_bytes * (2 if precision == "ieee" else 1)
    return accumulators + operands * operand_bytes // 4


class TunedKernel:
    """A ``@triton.jit`` kernel with tuning configs; launch with ``kernel[grid](*args, **constexprs)``.

    ``footprint(config, constexprs, element_bytes)`` counts the words one program keeps
    live (see ``live_words``); configs over the register budget for the launch's tile
    shape are skipped. On a GPU the rest are autotuned per ``key``; under the interpreter
    the first one runs. A kernel that updates tensors in place names their pointer
    arguments in ``restore_value``: autotuning runs it many times and restores them.
    """

    def __init__(self, fn, configs, key, footprint, restore_value=()):
        self.fn = fn
        self.configs = configs
        self.key = key
        self.footprint = footprint
        self.restore_value = list(restore_value)
        self._autotuned = {}

    def viable_configs(self, constexprs: dict, element_bytes: int) -> list:
        """The configs that fit the register budget (else the one that comes closest)."""
        def per_thread(c):
            return self.footprint(c, constexprs, element_bytes) / (32 * c.num_warps)
        fits = [c for c in self.configs if per_thread(c) <= REGISTER_BUDGET]
        return fits or [min(self.configs, key=per_thread)]

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            configs = self.viable_configs(constexprs, args[0].element_size())
            if interpreting():
                return self.fn[grid](*args, **constexprs, **configs[0].all_kwargs())
            chosen = tuple(self.configs.index(c) for c in configs)
            if chosen not in self._autotuned:
                self._autotuned[chosen] = triton.autotune(
                    configs=configs, key=self.key, restore_value=self.restore_value)(self.fn)
            return self._autotuned[chosen][grid](*args, **constexprs)
        return launch
