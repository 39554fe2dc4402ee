// Shared plumbing of the native CPU kernels: strided views, the thread pool, per-thread scratch.
//
// Nothing here includes pybind11 or instantiates standard-library algorithms inside kernel code: the
// kernels are compiled once per instruction set (isa_*.cpp under `#pragma GCC target`), and a template
// instantiated in one of those files must not leak AVX-512 code into the portable build through the
// linker's choice of a duplicate. module.cpp turns Python objects into these structs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace elastic {

// A strided view of a float32 matrix: a slice of a super weight or a batch of activations.
struct Matrix {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t stride_row = 0, stride_col = 0;

  float* row(int64_t r) const { return data + r * stride_row; }
  float& at(int64_t r, int64_t c) const { return data[r * stride_row + c * stride_col]; }
};

// A strided view of a float32 vector (bias, LayerNorm weight); `data == nullptr` means absent.
struct Vector {
  float* data = nullptr;
  int64_t size = 0, stride = 0;

  bool present() const { return data != nullptr; }
  float operator[](int64_t i) const { return data[i * stride]; }
};

// A strided view of a float32 [batch, tokens, channels] activation.
struct Tensor3 {
  float* data = nullptr;
  int64_t dims[3] = {0, 0, 0};
  int64_t strides[3] = {0, 0, 0};

  // Batch element b as a [tokens, channels] matrix.
  Matrix slice(int64_t b) const { return Matrix{data + b * strides[0], dims[1], dims[2], strides[1], strides[2]}; }
};

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// --- threads -------------------------------------------------------------------------------------

using RangeFn = void (*)(void* context, int64_t begin, int64_t end);

// Runs fn(context, begin, end) over [0, n) on up to `threads` threads (the caller included), handing
// out chunks of `grain` indices from a shared counter so that uneven work balances. The workers are
// persistent (started on first use, re-created after fork). An exception thrown by any chunk is
// rethrown here once all chunks have finished.
void parallel_run(int64_t n, int64_t grain, int threads, RangeFn fn, void* context);

template <class Body>
void parallel_for(int64_t n, int64_t grain, int threads, Body&& body) {
  using B = std::remove_reference_t<Body>;
  parallel_run(n, grain, threads, [](void* ctx, int64_t begin, int64_t end) { (*static_cast<B*>(ctx))(begin, end); },
               const_cast<void*>(static_cast<const void*>(&body)));
}

// --- scratch memory -----------------------------------------------------------------------------

// Per-thread buffers, 64-byte aligned and kept between calls so that the kernels neither allocate
// in their loops nor page-fault fresh memory on every call. Each slot is one independent buffer; the
// returned pointer is valid until the same thread asks for the same slot again.
// kShared* hold what the calling thread shares with the tasks of one call (packed weights); the
// others are used inside tasks only, so the caller, which runs tasks too, never clobbers its own.
enum class Slot : int { kPackA = 0, kTile, kKeys, kValues, kShared0, kShared1, kShared2, kShared3, kCount };
float* scratch(Slot slot, int64_t floats);

}  // namespace elastic
