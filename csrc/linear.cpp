// Elastic linear forward: y[m, :out] = x[m, :in] @ W[:out, :in]^T + b[:out], float32.
#include "kernels.h"

#include <cmath>

namespace elastic {

namespace {

constexpr int64_t kRowBlock = 4;    // rows of x that share each loaded weight row
constexpr int64_t kOutBlock = 64;   // weight rows kept hot in cache per pass

inline float gelu(float v) { return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f)); }

}  // namespace

void linear_forward(const Matrix& x, const Matrix& w, const Vector& b, const Matrix& y, bool apply_gelu) {
  const int64_t m = x.rows, in = x.cols, out = y.cols;
  parallel_for((m + kRowBlock - 1) / kRowBlock, 4, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> xbuf(kRowBlock * in);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      const int64_t r0 = blk * kRowBlock, nr = std::min(kRowBlock, m - r0);
      // Pack the rows into a contiguous buffer once, so the inner product runs on unit stride
      // whatever the strides of x.
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = 0; k < in; ++k) xbuf[r * in + k] = x.at(r0 + r, k);
      for (int64_t o0 = 0; o0 < out; o0 += kOutBlock) {
        const int64_t o1 = std::min(out, o0 + kOutBlock);
        for (int64_t o = o0; o < o1; ++o) {
          const float* wrow = w.row(o);
          float acc[kRowBlock] = {0.f, 0.f, 0.f, 0.f};
          if (w.stride_col == 1) {
            for (int64_t r = 0; r < nr; ++r) {
              const float* xr = xbuf.data() + r * in;
              float s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t k = 0; k < in; ++k) s += xr[k] * wrow[k];
              acc[r] = s;
            }
          } else {
            for (int64_t r = 0; r < nr; ++r) {
              const float* xr = xbuf.data() + r * in;
              float s = 0.f;
              for (int64_t k = 0; k < in; ++k) s += xr[k] * wrow[k * w.stride_col];
              acc[r] = s;
            }
          }
          const float bias = b.present() ? b[o] : 0.f;
          for (int64_t r = 0; r < nr; ++r) {
            float v = acc[r] + bias;
            y.at(r0 + r, o) = apply_gelu ? gelu(v) : v;
          }
        }
      }
    }
  });
}

}  // namespace elastic
