// kronops_aoti_runner: runs a model with kronops ops, exported in Python with torch.export and
// compiled by AOTInductor (torch._inductor.aoti_compile_and_package), in a C++ process
// without Python. The ops' schemas and CPU kernels come from the native library; a package
// compiled for CUDA runs on the GPU (its inputs are moved there, its outputs back).
//
//   kronops_aoti_runner MODEL.pt2 INPUTS OUTPUTS   run the model on the tensors in INPUTS,
//                                                  write its outputs to OUTPUTS
//   kronops_aoti_runner --schemas                  print the schema of every op in the table,
//                                                  as the dispatcher holds it
//
// Tensor files (csrc/runner/export_model.py writes and reads them): "KRT1", then an int64
// count and, per tensor, int64 dtype (0 float32, 1 float64), int64 ndim, ndim int64 sizes,
// and the elements, contiguous, little-endian.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kronops_native.h"

namespace {

int64_t read_i64(std::istream& in) {
  int64_t v = 0;
  if (!in.read(reinterpret_cast<char*>(&v), sizeof v)) throw std::runtime_error("truncated tensor file");
  return v;
}

void write_i64(std::ostream& out, int64_t v) { out.write(reinterpret_cast<const char*>(&v), sizeof v); }

std::vector<at::Tensor> read_tensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4];
  if (!in.read(magic, 4) || std::memcmp(magic, "KRT1", 4) != 0)
    throw std::runtime_error(path + ": not a tensor file (no KRT1 header)");
  std::vector<at::Tensor> tensors(read_i64(in));
  for (auto& t : tensors) {
    const int64_t code = read_i64(in);
    if (code != 0 && code != 1) throw std::runtime_error(path + ": unknown dtype code " + std::to_string(code));
    std::vector<int64_t> sizes(read_i64(in));
    for (auto& s : sizes) s = read_i64(in);
    t = at::empty(sizes, code == 0 ? at::kFloat : at::kDouble);
    if (!in.read(static_cast<char*>(t.data_ptr()), t.nbytes())) throw std::runtime_error(path + ": truncated");
  }
  return tensors;
}

void write_tensors(const std::string& path, const std::vector<at::Tensor>& tensors) {
  std::ofstream out(path, std::ios::binary);
  out.write("KRT1", 4);
  write_i64(out, static_cast<int64_t>(tensors.size()));
  for (const auto& t_in : tensors) {
    const at::Tensor t = t_in.contiguous();
    if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble)
      throw std::runtime_error("outputs must be float32 or float64");
    write_i64(out, t.scalar_type() == at::kFloat ? 0 : 1);
    write_i64(out, t.dim());
    for (int64_t s : t.sizes()) write_i64(out, s);
    out.write(static_cast<const char*>(t.const_data_ptr()), t.nbytes());
  }
  if (!out) throw std::runtime_error(path + ": write failed");
}

void check(const char* error, const char* what) {
  if (error) throw std::runtime_error(std::string(what) + ": " + error);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    check(kronops_native_define_schemas(), "defining the kronops schemas");
    check(kronops_native_register_cpu(), "registering the kronops CPU kernels");
    if (argc == 2 && std::string(argv[1]) == "--schemas") {
      for (int i = 0; i < kronops_native_schema_count(); ++i) {
        const std::string schema = kronops_native_schema(i);
        const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
            schema.substr(0, schema.find('(')).c_str(), "");
        std::cout << op.schema() << "\n";
      }
      return 0;
    }
    if (argc != 4) {
      std::cerr << "usage: " << argv[0] << " MODEL.pt2 INPUTS OUTPUTS | --schemas\n";
      return 2;
    }
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    // The inputs go to the device the package was compiled for (a CUDA package's kernels
    // are its own Triton kernels); the outputs come back to the host to be written.
    const auto metadata = loader.get_metadata();
    const auto device_key = metadata.find("AOTI_DEVICE_KEY");
    const c10::Device device(device_key == metadata.end() ? std::string("cpu") : device_key->second);
    std::vector<at::Tensor> inputs = read_tensors(argv[2]);
    for (auto& t : inputs) t = t.to(device);
    std::vector<at::Tensor> outputs = loader.run(inputs);
    for (auto& t : outputs) t = t.cpu();
    write_tensors(argv[3], outputs);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "kronops_aoti_runner: " << e.what() << "\n";
    return 1;
  }
}
