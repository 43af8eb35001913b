// Which instruction sets the native kernels use: detected once from cpuid, and lowered on
// request (KRONOPS_CPU_ISA, read and validated by kronops.native) so that every path can be
// tested on one machine. Levels, each including the ones below:
//   portable  BLAS calls only (torch's BLAS picks its own kernels);
//   avx2      our AVX2/FMA kernel for the per-row products (repeated_gemm.cpp);
//   avx512    bf16 products on torch's bf16 GEMMs where the CPU has AVX512-BF16 (oneDNN's
//             dot-product kernels, fp32 accumulation); fp32 kernels as at avx2;
//   amx       the same, the CPU having AMX-BF16 (oneDNN's tile kernels).
// Below avx512 (or without bf16 instructions) bf16 is computed in fp32 and rounded once.
#pragma once

namespace kronops::native {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };

// The highest level this CPU (and its OS) supports.
Isa detected_isa();

// The level in use: detected_isa(), or the lower one set by force_isa.
Isa cpu_isa();

// Uses `level` (at most detected_isa()) from now on.
void force_isa(Isa level);

// Whether bf16 products run on torch's bf16 GEMMs (level avx512 or amx, with AVX512-BF16 or
// AMX-BF16 on the CPU), rather than in fp32.
bool bf16_products();

}  // namespace kronops::native

extern "C" {
// detected_isa() as an int (Isa's values).
int kronops_native_detected_isa();
// The level in use, as an int.
int kronops_native_cpu_isa();
// bf16_products(): 1 or 0.
int kronops_native_bf16_products();
// force_isa(level); returns 0, or -1 (nothing changed) when level is not a level at most the
// detected one.
int kronops_native_force_isa(int level);
}
