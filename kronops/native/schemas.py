"""The op table's schemas, read from where they are written: the ``OpSpec`` of every op in
``kronops/<family>/ops.py``, each schema a string literal on a line of its own.

Python defines the ops from the specs (``kronops.backends.define``). The root
CMakeLists.txt runs ``codegen.py`` beside this file, which reads the same lines into C++
headers: the schemas (the native library defines them when no Python is there to do it: a
C++ program serving an exported model), the kernels' declarations and their registration
for CPU. tests/test_native_schemas.py checks that both sides register exactly these
strings. This module imports nothing from kronops, so that the build can run it alone.
"""
import glob
import os
import re

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A schema line of a spec: four spaces, the quoted schema, a comma (CMakeLists.txt names the
# same files, kronops/*/ops.py, as dependencies of the generated headers).
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
