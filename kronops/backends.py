"""The op table and the backends registered with PyTorch's dispatcher.

Every ``kronops::`` op is declared once, by an ``OpSpec`` in its family's ``ops.py``, and
``define(spec)`` makes it a ``torch.library`` custom op: its schema, its fake (what
torch.compile and opcheck trace), its autograd formula, its PyTorch kernel as the default
kernel on every device and its Triton kernel for CUDA (dtypes Triton does not take, fp64,
still run the PyTorch kernel there). Both Python kernels run after the spec's argument check
and with autocast off, so that what they return matches the fake. A CUDA call is also
visible to graph capture, as ``torch.library.triton_op`` makes it (``traced_on_cuda``):
torch.compile and AOTInductor trace it into its Triton launches (``wrap_triton``), so a
compiled graph or an AOTInductor package holds the kernels themselves. The native library
(``kronops.native``, when built) registers its C++ kernels for the CPU dispatch key of every
op once all are defined; it reads the same schemas (``kronops.native.schemas``).

``KRONOPS_BACKEND=composite`` (read at import) leaves CUDA on the PyTorch kernels too;
``KRONOPS_NATIVE=0`` leaves CPU on them. ``triton_on_cpu()`` runs the Triton kernels on CPU
tensors under ``TRITON_INTERPRET=1``: how the tests drive the kernels through the ops and
autograd without a GPU.
"""
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._library import triton as torch_triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.export._trace import custom_triton_ops_decomposition_disabled

from . import native
from .dtypes import autocast_off

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_CHOICES = ("auto", "composite")


@dataclass(frozen=True)
class OpSpec:
    """One op, declared once: ``define`` registers it; the native build and the
    ahead-of-time compiles read it.

    schema: ``"kronops::name(args) -> returns"``, written as a string literal on a line of
        its own (four spaces, the quoted schema, a comma): the root CMakeLists.txt and
        ``kronops.native.schemas`` read the op table from those lines.
    torch_kernel: the PyTorch kernel, taking the op's arguments: the default on every device.
    fake: the outputs' metadata from the arguments' (``register_fake``).
    backward, setup_context: the autograd formula (``register_autograd``), or None.
    triton: the CUDA kernel, taking the op's arguments (it launches Triton kernels), or None.
    compile_cases: the ``compile_cases`` of every Triton kernel it launches
        (``kronops.kernels.aot`` compiles them ahead of time).
    check: the argument check run before either Python kernel (the native kernel's rules),
        or None where the public functions check.
    mutates: the arguments the op writes in place.

    The native kernel is ``kronops::native::<name>`` in csrc/<family>.cpp; its declaration
    and its registration for CPU are generated from the schema.
    """
    schema: str
    torch_kernel: Callable
    fake: Callable
    backward: Callable | None = None
    setup_context: Callable | None = None
    triton: Callable | None = None
    compile_cases: tuple[Callable, ...] = ()
    check: Callable | None = None
    mutates: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        """``"kronops::name"``."""
        return self.schema[:self.schema.index("(")]


SPECS: list[OpSpec] = []    # the op table: every op defined so far, in order
_triton_ops = {}            # op -> spec, for every op with its Triton kernel registered
_cpu_registered = set()     # ops whose Triton kernel is also registered for "cpu"
_triton_devices = {"cuda"}  # device types whose tensors take the Triton kernels


def backend_choice() -> str:
    choice = os.environ.get("KRONOPS_BACKEND", "auto")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"KRONOPS_BACKEND must be one of {BACKEND_CHOICES}, got {choice!r}")
    return choice


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _checked(spec: OpSpec, kernel: Callable) -> Callable:
    """``kernel`` after ``spec``'s argument check, with autocast off on the first tensor's
    device (every op's first argument is a tensor)."""
    def run(*args, **kwargs):
        if spec.check is not None:
            spec.check(*args, **kwargs)
        with autocast_off(args[0].device.type):
            return kernel(*args, **kwargs)
    return run


def takes_triton(t: torch.Tensor) -> bool:
    """Whether a tensor of ``t``'s device and dtype takes the Triton kernels."""
    return t.dtype in TRITON_DTYPES and t.device.type in _triton_devices


def _triton_kernel(spec: OpSpec) -> Callable:
    """The kernel registered for CUDA: ``spec.triton`` where the op's first tensor takes the
    Triton kernels, else the PyTorch kernel. Its launches go straight to Triton (the
    ``wrap_triton`` around them records a graph node only while ``traced_on_cuda`` traces)."""
    triton, torch_kernel = _checked(spec, spec.triton), _checked(spec, spec.torch_kernel)

    def run(first, *args, **kwargs):
        if not takes_triton(first):
            return torch_kernel(first, *args, **kwargs)
        with set_wrap_triton_enabled(False):
            return triton(first, *args, **kwargs)
    return run


_TRACED_TYPES = (torch.Tensor, FakeTensor, FunctionalTensor)


def traced_on_cuda(spec: OpSpec) -> Callable:
    """The op's rule under ``FunctionalTensorMode`` (how torch.compile's and AOTInductor's
    tracing see a call), as ``torch.library.triton_op`` registers it: a call whose first
    tensor is a CUDA tensor of a Triton dtype is traced through ``spec.triton``, whose
    ``wrap_triton`` launches become ``triton_kernel_wrapper`` nodes; any other call (CPU, so
    that compiled CPU graphs keep calling the native kernels; fp64; the interpreter, whose
    kernels cannot be traced; torch.export, which keeps the op in the exported program until
    ``run_decompositions(decompose_custom_triton_ops=True)`` or AOTInductor's lowering) stays
    one call of the op. Integer tensors (indices, token lists) go to the launcher as copies:
    Triton's mutation analysis counts a tensor whose loaded values address a store through a
    helper call as written, and a traced graph would then write the caller's index back (or,
    in an AOTInductor package, mutate a constant); a copy of a few hundred integers does not.

    Why not ``torch.library.triton_op`` itself (torch 2.13): it infers the schema from the
    function's annotations (its ``schema=`` is not used), makes that one function the kernel
    of every device and the fake, and traces every call under ``FunctionalTensorMode``,
    CPU ones included; the op table needs the spec's schema, the PyTorch kernel by default,
    the native kernels on CPU (also in compiled CPU graphs and CPU AOTInductor packages) and
    the spec's fake. So the op stays a ``custom_op`` and gets triton_op's CUDA half here."""
    triton = _checked(spec, spec.triton)

    def rule(mode, func, types, args, kwargs):
        first = args[0]
        if (first.device.type != "cuda" or first.dtype not in TRITON_DTYPES or interpreting()
                or custom_triton_ops_decomposition_disabled()
                or not all(issubclass(t, _TRACED_TYPES) for t in types)):
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            args = [a.clone() if isinstance(a, torch.Tensor) and not a.is_floating_point() else a
                    for a in args]
            return triton(*args, **kwargs)
    return rule


def define(spec: OpSpec):
    """The custom op ``spec`` declares, registered (its Triton kernel for CUDA unless
    ``KRONOPS_BACKEND=composite``) and added to the op table; once every op of the table is
    defined, the native library loads (its kernels are checked against the schemas as they
    register)."""
    if spec.schema not in native.SCHEMAS:
        raise ValueError(f"{spec.qualname}: its schema is not in the op table; write it as a "
                         f"string literal on a line of its own, as kronops.native.schemas "
                         f"reads it")
    op = torch.library.custom_op(spec.qualname, _checked(spec, spec.torch_kernel),
                                 mutates_args=spec.mutates,
                                 schema=spec.schema[len(spec.qualname):])
    op.register_fake(spec.fake)
    if spec.backward is not None:
        op.register_autograd(spec.backward, setup_context=spec.setup_context)
    if spec.triton is not None and backend_choice() != "composite":
        op.register_kernel("cuda")(_triton_kernel(spec))
        op.register_torch_dispatch(FunctionalTensorMode, traced_on_cuda(spec))
        # What triton_op records of its kernels, where this torch keeps that table: compiled
        # graphs' cache keys hash their source.
        if hasattr(torch_triton, "triton_ops_to_kernels"):
            torch_triton.triton_ops_to_kernels[spec.qualname] = list(
                {case.kernel: None for cases in spec.compile_cases for case in cases()})
        _triton_ops[op] = spec
    SPECS.append(spec)
    if {s.qualname for s in SPECS}.issuperset(native.op_names()):
        native.load()
    return op


def torch_kernel_serves(op, t: torch.Tensor) -> bool:
    """Whether ``op``'s PyTorch kernel runs for a call whose first tensor is ``t``: neither
    the native library (CPU tensors, while it is active) nor a Triton kernel takes it."""
    if t.device.type == "cpu" and native.active():
        return False
    return not (op in _triton_ops and takes_triton(t))


def native_kernel_keeps(t: torch.Tensor) -> bool:
    """Whether the native kernel that takes a call whose first tensor is ``t`` uses a kept
    intermediate in its backward: bf16 on bf16 GEMMs (``native.bf16_products()``); its other
    routes recompute it in cache."""
    return (t.device.type == "cpu" and t.dtype == torch.bfloat16 and native.active()
            and native.bf16_products())


def keeps_intermediate(op, t: torch.Tensor) -> bool:
    """Whether the kernel serving ``op`` for a call whose first tensor is ``t`` uses a kept
    intermediate in its backward: the PyTorch kernel, or ``native_kernel_keeps``; the Triton
    kernels recompute it."""
    return torch_kernel_serves(op, t) or native_kernel_keeps(t)


def run_keeping(op, keeping, args: tuple, needed: bool):
    """``op(*args)``, or ``keeping(*args)[0]`` where grad mode is on, the backward would use
    what ``keeping`` keeps (``needed``) and the kernel serving the call uses it
    (``keeps_intermediate``). ``keeping`` is the variant of ``op`` that also returns it."""
    if needed and torch.is_grad_enabled() and keeps_intermediate(op, args[0]):
        return keeping(*args)[0]
    return op(*args)


@contextlib.contextmanager
def triton_on_cpu():
    """Inside, CPU tensors run the Triton kernels in the interpreter (``TRITON_INTERPRET=1``);
    the native kernels, registered for CPU ahead of them, are set aside meanwhile."""
    if not interpreting():
        raise RuntimeError("triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    for op, spec in _triton_ops.items():
        if op not in _cpu_registered:
            op.register_kernel("cpu")(_triton_kernel(spec))
            _cpu_registered.add(op)
    with native.disabled():
        _triton_devices.add("cpu")
        try:
            yield
        finally:
            _triton_devices.discard("cpu")
