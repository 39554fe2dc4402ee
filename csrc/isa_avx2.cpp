// The kernels compiled for AVX2 + FMA (x86-64-v3), chosen at run time where the CPU has them.
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <cstring>
#include <immintrin.h>

// After every #include: only the kernels below are compiled for AVX2.
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define ELASTIC_SIMD_WIDTH 8
#define ELASTIC_ISA avx2
#define ELASTIC_ISA_NAME "avx2"
#define ELASTIC_TABLE_FUNCTION kernel_table_avx2
#include "kernels_impl.h"
#else
namespace elastic {
const KernelTable* kernel_table_avx2() { return nullptr; }
}  // namespace elastic
#endif
