// Registration with the dispatcher: the CPU kernels of every op in the op table, and the
// schemas themselves for a process without Python (both lists generated from the op specs). Both are torch::Library objects held
// here, so that registering can be undone (kronops.native.disabled() in Python).
#include "kronops_native.h"

#include <torch/library.h>

#include <memory>
#include <string>

#include "kronops_registration.h"  // generated from the op specs by kronops/native/schemas.py

namespace {

std::unique_ptr<torch::Library> cpu_kernels, schemas;
std::string last_error;

template <class F>
const char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    last_error = e.what();
    return last_error.c_str();
  }
}

}  // namespace

extern "C" {

const char* kronops_native_register_cpu() {
  return guarded([] {
    if (cpu_kernels) return;
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "kronops",
                                                c10::DispatchKey::CPU, __FILE__, __LINE__);
    kronops_register_kernels(*lib);
    cpu_kernels = std::move(lib);
  });
}

void kronops_native_unregister_cpu() { cpu_kernels.reset(); }

const char* kronops_native_define_schemas() {
  return guarded([] {
    if (schemas) return;
    auto lib = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "kronops", std::nullopt,
                                                __FILE__, __LINE__);
    for (const char* schema : kronops_schemas) lib->def(schema);
    schemas = std::move(lib);
  });
}

int kronops_native_schema_count() {
  return static_cast<int>(sizeof(kronops_schemas) / sizeof(kronops_schemas[0]));
}

const char* kronops_native_schema(int i) {
  return i >= 0 && i < kronops_native_schema_count() ? kronops_schemas[i] : nullptr;
}
}
