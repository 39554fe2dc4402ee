// The kernels for any CPU, on the compiler's portable 4-lane vectors (SSE2 on x86-64, NEON on ARM).
#include "kernels.h"

#define ELASTIC_SIMD_WIDTH 4
#define ELASTIC_ISA generic
#define ELASTIC_ISA_NAME "generic"
#define ELASTIC_TABLE_FUNCTION kernel_table_generic
#include "kernels_impl.h"
