"""The schema of every ``kronops::`` op that has a native CPU kernel, written once.

Python defines the ops from these strings (``torch.library.custom_op(..., schema=...)``).
The root CMakeLists.txt reads the quoted lines below into a C++ header, from which the
native library defines the same schemas when no Python is there to do it (a C++ program
serving an exported model). tests/test_native_schemas.py checks that both sides register
exactly these strings. Keep one schema per line, in double quotes, as below.
"""
SCHEMAS = (
    "kronops::kron_rows(Tensor x, Tensor a, Tensor b, Tensor? bias, float scale) -> Tensor",
    "kronops::kron_rows_keep(Tensor x, Tensor a, Tensor b, Tensor? bias, float scale) -> (Tensor, Tensor)",
    "kronops::kron_factor_grad(Tensor dy, Tensor f, Tensor x, float scale) -> Tensor",
    "kronops::kron_rows_grads(Tensor dy, Tensor x, Tensor a, Tensor b, float scale, bool need_x, bool need_a, bool need_b, Tensor? inner=None) -> (Tensor, Tensor, Tensor)",
    "kronops::kron_mode(Tensor x, Tensor f) -> Tensor",
    "kronops::sparse_linear(Tensor x, Tensor weight, Tensor delta, Tensor? index, SymInt start, Tensor? bias, bool cols) -> Tensor",
    "kronops::sparse_input_grad(Tensor dy, Tensor weight, Tensor delta, Tensor? index, SymInt start, bool cols) -> Tensor",
    "kronops::sparse_delta_grad(Tensor dy, Tensor x, Tensor? index, SymInt start, bool cols, SymInt rows_of_delta) -> Tensor",
    "kronops::routed_kron_add(Tensor(a0!) y, Tensor x, Tensor a, Tensor b, Tensor tokens, Tensor tiles, SymInt[] offsets, SymInt[] starts) -> ()",
    "kronops::routed_sparse_add(Tensor(a0!) y, Tensor x, Tensor values, Tensor index, Tensor tokens, Tensor tiles, SymInt[] offsets, SymInt[] starts, SymInt[] widths, bool cols) -> ()",
    "kronops::sparse_adamw(Tensor(a0!) weight, Tensor grad, Tensor(a2!) exp_avg, Tensor(a3!) exp_avg_sq, Tensor(a4!)? master, Tensor? index, SymInt start, bool cols, float lr, float beta1, float beta2, float eps, float weight_decay, SymInt step) -> ()",
)


def op_names() -> list[str]:
    """The qualified names ("kronops::kron_rows", ...) in table order."""
    return [s[:s.index("(")] for s in SCHEMAS]


def schema(qualname: str) -> str:
    """The schema of ``qualname`` without its name, as ``torch.library.custom_op`` takes it."""
    for s in SCHEMAS:
        if s.startswith(qualname + "("):
            return s[len(qualname):]
    raise KeyError(f"no schema for {qualname!r} in kronops.native.schemas")
