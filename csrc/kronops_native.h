// Entry points of the native library, callable from C++ and from Python's ctypes.
//
// Python defines the kronops ops itself and calls kronops_native_register_cpu() when the
// package is imported. A C++ program without Python calls kronops_native_define_schemas()
// first (the same schema strings, from the op specs in kronops/*/ops.py), then registers.
#pragma once

extern "C" {

// Registers the native kernels for the CPU dispatch key of every op in the op table
// (again after kronops_native_unregister_cpu). Returns nullptr, or why it failed.
const char* kronops_native_register_cpu();

// Removes that registration: CPU tensors take the ops' other kernels again.
void kronops_native_unregister_cpu();

// Defines the op schemas (for a process where Python did not). Returns nullptr, or why not.
const char* kronops_native_define_schemas();

// The number of schemas in the table, and the i-th one (as "kronops::name(...) -> ...").
int kronops_native_schema_count();
const char* kronops_native_schema(int i);
}
