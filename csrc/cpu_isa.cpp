// CPU feature detection of the native kernels (cpu_isa.h).
#include "cpu_isa.h"

#include <cpuid.h>

#include <atomic>
#include <cstdint>

namespace kronops::native {
namespace {

// AMX-BF16 and AMX-TILE (cpuid leaf 7, edx bits 22 and 24), with the tile state enabled by
// the OS (XCR0 bits 17 and 18). oneDNN asks Linux for permission to use it.
bool has_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);
}

bool has_bf16_instructions() {
  return __builtin_cpu_supports("avx512bf16") || has_amx_bf16();
}

Isa detect() {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::portable;
  if (!__builtin_cpu_supports("avx512f")) return Isa::avx2;
  return has_amx_bf16() ? Isa::amx : Isa::avx512;
}

std::atomic<int> forced{-1};

}  // namespace

Isa detected_isa() {
  static const Isa level = detect();
  return level;
}

Isa cpu_isa() {
  const int level = forced.load(std::memory_order_relaxed);
  return level < 0 ? detected_isa() : static_cast<Isa>(level);
}

void force_isa(Isa level) { forced.store(static_cast<int>(level), std::memory_order_relaxed); }

bool bf16_products() {
  static const bool instructions = has_bf16_instructions();
  return cpu_isa() >= Isa::avx512 && instructions;
}

}  // namespace kronops::native

extern "C" {

int kronops_native_detected_isa() { return static_cast<int>(kronops::native::detected_isa()); }

int kronops_native_cpu_isa() { return static_cast<int>(kronops::native::cpu_isa()); }

int kronops_native_bf16_products() { return kronops::native::bf16_products() ? 1 : 0; }

int kronops_native_force_isa(int level) {
  if (level < 0 || level > static_cast<int>(kronops::native::detected_isa())) return -1;
  kronops::native::force_isa(static_cast<kronops::native::Isa>(level));
  return 0;
}
}
