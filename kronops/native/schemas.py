"""The op table's schemas, read from where they are written: the ``OpSpec`` of every op in
``kronops/<family>/ops.py``, each schema a string literal on a line of its own.

Python defines the ops from the specs (``kronops.backends.define``). The root
CMakeLists.txt runs this file (``python kronops/native/schemas.py OUT_DIR``), which writes
the same lines into the native library's generated headers: ``kronops_kernels.h``, the
declaration of every op's C++ kernel ``kronops::native::<name>`` (its C++ signature follows
from the schema: a kernel that disagrees fails the build), and ``kronops_registration.h``,
the schemas (the library defines them when no Python is there to do it: a C++ program
serving an exported model) and the kernels' registration for CPU.
tests/native/test_native_schemas.py checks that both sides register exactly these strings. This
module imports nothing from kronops, so that the build can run it alone.
"""
import glob
import os
import re
import sys

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A schema line of a spec: four spaces, the quoted schema, a comma.
SCHEMA_LINE = re.compile(r'^    "(kronops::[a-z0-9_]+\(.*\) -> .*)",$')


def spec_files() -> list[str]:
    """The families' ``ops.py`` files, in the table's order (sorted by path)."""
    return sorted(glob.glob(os.path.join(PACKAGE, "*", "ops.py")))


def read_schemas(paths) -> tuple[str, ...]:
    """Every schema line of ``paths``, in order."""
    found = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            found += [m.group(1) for line in f if (m := SCHEMA_LINE.match(line.rstrip("\n")))]
    return tuple(found)


SCHEMAS = read_schemas(spec_files())


def op_names() -> list[str]:
    """The qualified names ("kronops::kron_rows", ...) in table order."""
    return [s[:s.index("(")] for s in SCHEMAS]


def schema(qualname: str) -> str:
    """The schema of ``qualname`` without its name, as ``torch.library.custom_op`` takes it."""
    for s in SCHEMAS:
        if s.startswith(qualname + "("):
            return s[len(qualname):]
    raise KeyError(f"no schema for {qualname!r} in the op table (kronops/*/ops.py)")


# C++ parameter types of the schema's argument types (alias annotations such as (a0!) removed:
# the kernels take written tensors as const references too, as ATen's do).
CPP_ARGUMENTS = {"Tensor": "const at::Tensor&", "Tensor?": "const std::optional<at::Tensor>&",
                 "float": "double", "int": "int64_t", "SymInt": "int64_t", "bool": "bool",
                 "int[]": "at::IntArrayRef", "SymInt[]": "at::IntArrayRef"}
ALIAS = re.compile(r"\([a-z0-9]+!?\)")


def cpp_declaration(entry: str) -> str:
    """The C++ declaration of the kernel of the schema ``entry``: ``Tensor`` returns
    ``at::Tensor``, a tuple of them ``std::tuple<...>``, ``()`` void."""
    match = re.fullmatch(r"kronops::(\w+)\((.*)\) -> (.*)", entry)
    name, arguments, returns = match.groups()
    params = []
    for argument in arguments.split(", "):
        kind, arg = argument.split("=")[0].rsplit(" ", 1)
        kind = ALIAS.sub("", kind)
        if kind not in CPP_ARGUMENTS:
            raise ValueError(f"{entry}: no C++ type for the argument type {kind!r}")
        params.append(f"{CPP_ARGUMENTS[kind]} {arg}")
    outputs = [r for r in returns.strip("()").split(", ") if r]
    if any(r != "Tensor" for r in outputs):
        raise ValueError(f"{entry}: the kernels return tensors only, got {returns!r}")
    result = ("void" if not outputs else "at::Tensor" if returns == "Tensor" else
              f"std::tuple<{', '.join(['at::Tensor'] * len(outputs))}>")
    return f"{result} {name}({', '.join(params)});"


GENERATED = "// Generated from the op specs (kronops/*/ops.py) by kronops/native/schemas.py: do not edit.\n"


def headers(schemas=SCHEMAS) -> dict[str, str]:
    """{file name: text} of the generated headers."""
    if not schemas:
        raise ValueError("no schema found in kronops/*/ops.py")
    names = [s[len("kronops::"):s.index("(")] for s in schemas]
    kernels = "\n".join(cpp_declaration(s) for s in schemas)
    entries = "\n".join(f'    "{s}",' for s in schemas)
    impls = "\n".join(f'  lib.impl("{n}", TORCH_FN(kronops::native::{n}));' for n in names)
    return {
        "kronops_kernels.h": (
            f"{GENERATED}// The native CPU kernels of the kronops ops, one function per op, "
            f"defined in csrc/<family>.cpp.\n#pragma once\n\n#include <ATen/core/Tensor.h>\n"
            f"#include <c10/util/ArrayRef.h>\n\n#include <optional>\n#include <tuple>\n\n"
            f"namespace kronops::native {{\n\n{kernels}\n\n}}  // namespace kronops::native\n"),
        "kronops_registration.h": (
            f"{GENERATED}// The schemas of the op table, and the registration of every op's "
            f"CPU kernel.\n#pragma once\n\n#include <torch/library.h>\n\n"
            f'#include "kronops_kernels.h"\n\n'
            f"static const char* const kronops_schemas[] = {{\n{entries}\n}};\n\n"
            f"inline void kronops_register_kernels(torch::Library& lib) {{\n{impls}\n}}\n"),
    }


def write_headers(directory: str) -> None:
    """Write the generated headers into ``directory``, leaving a file whose text is already
    the same untouched (no rebuild of what includes it)."""
    os.makedirs(directory, exist_ok=True)
    for name, text in headers().items():
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python kronops/native/schemas.py OUT_DIR")
    write_headers(sys.argv[1])
