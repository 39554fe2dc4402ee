// The kernels compiled for AVX-512 (x86-64-v4), chosen at run time where the CPU has it.
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -W(maybe-)uninitialized flags
// wherever they are inlined (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cstring>
#include <immintrin.h>

// After every #include: only the kernels below are compiled for AVX-512.
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,bmi,bmi2,f16c")
#define ELASTIC_SIMD_WIDTH 16
#define ELASTIC_ISA avx512
#define ELASTIC_ISA_NAME "avx512"
#define ELASTIC_TABLE_FUNCTION kernel_table_avx512
#include "kernels_impl.h"
#else
namespace elastic {
const KernelTable* kernel_table_avx512() { return nullptr; }
}  // namespace elastic
#endif
