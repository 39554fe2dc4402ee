// The kernels, written once against simd.h and compiled once per instruction set (isa_*.cpp).
//
// Everything is built on one register-blocked GEMM, C = A @ B (+ bias, scale, GELU):
// - B is packed once per call into panels of kNR columns, B[k][c] at panel[k * kNR + c % kNR], so the
//   micro-kernel streams it with unit stride whatever the strides of the super weight slice it came
//   from; panels are packed at the largest active size and a subnet reads the leading `depth` rows
//   and leading panels of them, which is what makes the grouped (K subnets) kernels free.
// - A is packed per block of kMR rows, A[r][k] at block[k * kMR + r]; the micro-kernel broadcasts one
//   A value per row and multiplies it by two B vectors, keeping a kMR x kNR tile of C in registers.
// Apart from reading the size tables, no standard-library templates are instantiated here (see common.h).
#pragma once

#include "kernels.h"
#include "simd.h"

namespace elastic {
namespace ELASTIC_ISA {

constexpr int kNR = 2 * kLanes;                 // columns of C per micro-tile: two vectors
constexpr int kMR = kLanes == 16 ? 12 : 6;      // rows of C per micro-tile: 2 * kMR accumulators
constexpr int64_t kRowChunk = 8 * kMR;          // rows of A packed at once and swept over all panels
constexpr int64_t kMlpRowChunk = 4 * kMR;       // rows whose hidden activation stays in L2 in the MLP

// B operand in panels: column c, depth k at data[(c / kNR) * panel_stride + k * kNR + c % kNR].
// A packed panel set can serve any leading depth <= the depth it was packed with.
struct Panels {
  const float* data = nullptr;
  int64_t depth = 0, cols = 0, panel_stride = 0;

  int64_t count() const { return ceil_div(cols, kNR); }
  const float* panel(int64_t p) const { return data + p * panel_stride; }
  Panels leading(int64_t new_depth, int64_t new_cols) const { return Panels{data, new_depth, new_cols, panel_stride}; }
};

inline int64_t padded_cols(int64_t cols) { return ceil_div(cols, kNR) * kNR; }

// Packs panels [panel_begin, panel_end) of B[k][c] = source(c)[k * stride_k], k < depth, c < cols.
template <class Source>
void pack_panels(Source source, int64_t stride_k, int64_t depth, int64_t cols, float* dst, int64_t panel_begin,
                 int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    float* panel = dst + p * depth * kNR;
    for (int j = 0; j < kNR; ++j) {
      const int64_t c = p * kNR + j;
      if (c < cols) {
        const float* src = source(c);
        for (int64_t k = 0; k < depth; ++k) panel[k * kNR + j] = src[k * stride_k];
      } else {
        for (int64_t k = 0; k < depth; ++k) panel[k * kNR + j] = 0.0f;
      }
    }
  }
}

// B = W^T for a weight slice W [cols, depth] (rows are output features), packed by `threads` threads.
inline Panels pack_weight(const Matrix& w, float* dst, int threads) {
  const Panels panels{dst, w.cols, w.rows, w.cols * kNR};
  parallel_for(panels.count(), 1, threads, [&](int64_t begin, int64_t end) {
    pack_panels([&](int64_t c) { return w.row(c); }, w.stride_col, w.cols, w.rows, dst, begin, end);
  });
  return panels;
}

// A contiguous copy of v[:size] zero padded to whole panels; nullptr if v is absent.
inline const float* pack_bias(const Vector& v, int64_t size, float* dst) {
  if (!v.present()) return nullptr;
  for (int64_t i = 0; i < padded_cols(size); ++i) dst[i] = i < size ? v[i] : 0.0f;
  return dst;
}

// Packs rows [0, rows) of a (depth columns) into blocks of kMR rows, zero padding the last block.
inline void pack_a(const Matrix& a, int64_t depth, float* dst) {
  for (int64_t r0 = 0; r0 < a.rows; r0 += kMR) {
    float* block = dst + r0 * depth;
    const int64_t n = min64(kMR, a.rows - r0);
    for (int64_t r = 0; r < kMR; ++r) {
      if (r < n) {
        const float* src = a.row(r0 + r);
        if (a.stride_col == 1) {
          for (int64_t k = 0; k < depth; ++k) block[k * kMR + r] = src[k];
        } else {
          for (int64_t k = 0; k < depth; ++k) block[k * kMR + r] = src[k * a.stride_col];
        }
      } else {
        for (int64_t k = 0; k < depth; ++k) block[k * kMR + r] = 0.0f;
      }
    }
  }
}

struct Epilogue {
  const float* bias = nullptr;  // padded to whole panels (pack_bias), indexed by column of C
  float scale = 1.0f;           // applied to A @ B before the bias
  bool gelu = false;
};

inline vfloat finish(vfloat acc, vfloat scale, vfloat bias, bool gelu) {
  const vfloat v = vfma(acc, scale, bias);
  return gelu ? vgelu(v) : v;
}

// One kMR x kNR tile of C: `rows` and `cols` say how much of it is stored.
inline void micro_tile(const float* a_block, const float* panel, int64_t depth, const Epilogue& ep, int64_t col0,
                       int rows, int cols, float* c, int64_t ldc) {
  vfloat acc0[kMR], acc1[kMR];
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) acc0[r] = acc1[r] = vzero();
  for (int64_t k = 0; k < depth; ++k) {
    const vfloat b0 = vload(panel + k * kNR), b1 = vload(panel + k * kNR + kLanes);
    const float* a = a_block + k * kMR;
#pragma GCC unroll 16
    for (int r = 0; r < kMR; ++r) {
      const vfloat ar = vbroadcast(a[r]);
      acc0[r] = vfma(ar, b0, acc0[r]);
      acc1[r] = vfma(ar, b1, acc1[r]);
    }
  }
  const vfloat scale = vbroadcast(ep.scale);
  const vfloat bias0 = ep.bias ? vload(ep.bias + col0) : vzero();
  const vfloat bias1 = ep.bias ? vload(ep.bias + col0 + kLanes) : vzero();
#pragma GCC unroll 16
  for (int r = 0; r < kMR; ++r) {
    if (r < rows) {
      float* out = c + r * ldc;
      const vfloat v0 = finish(acc0[r], scale, bias0, ep.gelu);
      if (cols >= kNR) {
        vstore(out, v0);
        vstore(out + kLanes, finish(acc1[r], scale, bias1, ep.gelu));
      } else if (cols > kLanes) {
        vstore(out, v0);
        vstore_n(out + kLanes, finish(acc1[r], scale, bias1, ep.gelu), cols - kLanes);
      } else {
        vstore_n(out, v0, cols);
      }
    }
  }
}

// C[:a.rows, columns of panels [panel_begin, panel_end)] = epilogue(a[:, :b.depth] @ B); c points at
// column 0 of row 0. Runs on the calling thread; A is packed kRowChunk rows at a time.
inline void gemm(const Matrix& a, const Panels& b, int64_t panel_begin, int64_t panel_end, const Epilogue& ep, float* c,
                 int64_t ldc) {
  const int64_t depth = b.depth;
  float* packed = scratch(Slot::kPackA, kRowChunk * max64(depth, 1));
  for (int64_t r0 = 0; r0 < a.rows; r0 += kRowChunk) {
    const int64_t rows = min64(kRowChunk, a.rows - r0);
    pack_a(Matrix{a.row(r0), rows, depth, a.stride_row, a.stride_col}, depth, packed);
    for (int64_t p = panel_begin; p < panel_end; ++p) {
      const int cols = static_cast<int>(min64(kNR, b.cols - p * kNR));
      for (int64_t i = 0; i < rows; i += kMR) {
        micro_tile(packed + i * depth, b.panel(p), depth, ep, p * kNR, static_cast<int>(min64(kMR, rows - i)), cols,
                   c + (r0 + i) * ldc + p * kNR, ldc);
      }
    }
  }
}

inline void zero_columns(float* row, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) row[i] = 0.0f;
}

// Splits the columns of a GEMM into groups so that rows x groups gives every thread several tasks.
inline int64_t panel_groups(int64_t row_tasks, int64_t panels, int threads) {
  return max64(1, min64(panels, ceil_div(4 * threads, max64(row_tasks, 1))));
}

// y[k rows] = epilogue(x @ W^T) for each subnet k, tasks over (subnet, row chunk, column group).
inline void grouped_gemm(const Tensor3& x, const Panels& w, const Sizes& out, const Epilogue& ep, const Tensor3& y,
                         int threads) {
  const int64_t groups = x.dims[0], rows = x.dims[1], width = y.dims[2];
  const int64_t chunks = ceil_div(rows, kRowChunk);
  const int64_t column_groups = panel_groups(groups * chunks, w.count(), threads);
  const int64_t panels_per_group = ceil_div(w.count(), column_groups);
  parallel_for(groups * chunks * column_groups, 1, threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / (chunks * column_groups), chunk = task / column_groups % chunks;
      const int64_t group = task % column_groups;
      const Panels active = w.leading(w.depth, out[k]);
      const int64_t panel_begin = group * panels_per_group;
      const int64_t panel_end = min64(active.count(), panel_begin + panels_per_group);
      const int64_t r0 = chunk * kRowChunk, n = min64(kRowChunk, rows - r0);
      const Matrix xk = x.slice(k);
      float* yk = y.data + k * y.strides[0] + r0 * y.strides[1];
      if (panel_begin < panel_end) {
        gemm(Matrix{xk.row(r0), n, xk.cols, xk.stride_row, xk.stride_col}, active, panel_begin, panel_end, ep, yk,
             y.strides[1]);
      }
      if (group == 0) {  // no GEMM writes past out[k], so this cannot race
        for (int64_t r = 0; r < n; ++r) zero_columns(yk + r * y.strides[1], out[k], width);
      }
    }
  });
}

// --- linear ------------------------------------------------------------------------------------

void linear(const LinearArgs& args) {
  int64_t out_max = 0;
  for (int32_t o : args.out) out_max = max64(out_max, o);
  const Matrix w{args.w.data, out_max, args.w.cols, args.w.stride_row, args.w.stride_col};
  const Panels panels = pack_weight(w, scratch(Slot::kShared0, padded_cols(out_max) * w.cols), args.threads);
  Epilogue ep;
  ep.bias = pack_bias(args.b, out_max, scratch(Slot::kShared1, padded_cols(out_max)));
  ep.gelu = args.gelu;
  grouped_gemm(args.x, panels, args.out, ep, args.y, args.threads);
}

// --- layer norm --------------------------------------------------------------------------------

// Sum over x[:d] of f(x[i]) for f vectorised, four accumulators deep: a row is short, so the latency of a
// single accumulator chain, not bandwidth, would bound the loop. Lanes past d contribute f(0) * 0.
template <class F>
inline float row_sum(const float* x, int64_t d, F f) {
  vfloat acc[4] = {vzero(), vzero(), vzero(), vzero()};
  int64_t i = 0;
  for (; i + 4 * kLanes <= d; i += 4 * kLanes) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[u] = vadd(acc[u], f(vload(x + i + u * kLanes)));
  }
  for (; i + kLanes <= d; i += kLanes) acc[0] = vadd(acc[0], f(vload(x + i)));
  if (i < d) {
    static const float ones[16] = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
    const int n = static_cast<int>(d - i);
    acc[1] = vfma(f(vload_n(x + i, n)), vload_n(ones, n), acc[1]);
  }
  return vreduce_add(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
}

// Function objects rather than lambdas: GCC compiles a captureless lambda's function-pointer thunk
// without the translation unit's `#pragma GCC target`.
struct Identity {
  vfloat operator()(vfloat v) const { return v; }
};
struct SquaredDeviation {
  vfloat mean;
  vfloat operator()(vfloat v) const {
    const vfloat c = vsub(v, mean);
    return vmul(c, c);
  }
};

// y[:d] = (x[:d] - mean) / sqrt(var + eps) * gamma + beta; two passes for the statistics over a row in L1.
inline void layer_norm_row(const float* x, int64_t d, const float* gamma, const float* beta, float eps, float* y) {
  const vfloat mean = vbroadcast(row_sum(x, d, Identity{}) / static_cast<float>(d));
  const float var = row_sum(x, d, SquaredDeviation{mean}) / static_cast<float>(d);
  const vfloat rstd = vbroadcast(1.0f / __builtin_sqrtf(var + eps));
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    vfloat v = vmul(vsub(vload(x + i), mean), rstd);
    if (gamma) v = vmul(v, vload(gamma + i));
    if (beta) v = vadd(v, vload(beta + i));
    vstore(y + i, v);
  }
  if (i < d) {
    const int n = static_cast<int>(d - i);
    vfloat v = vmul(vsub(vload_n(x + i, n), mean), rstd);
    if (gamma) v = vmul(v, vload_n(gamma + i, n));
    if (beta) v = vadd(v, vload_n(beta + i, n));
    vstore_n(y + i, v, n);
  }
}

void layer_norm(const LayerNormArgs& args) {
  const int64_t groups = args.x.dims[0], rows = args.x.dims[1], width = args.y.dims[2];
  float* gamma = scratch(Slot::kShared0, width);
  float* beta = scratch(Slot::kShared1, width);
  int64_t embed_max = 0;
  for (int32_t e : args.embed) embed_max = max64(embed_max, e);
  const float* g = args.gamma.present() ? gamma : nullptr;
  const float* b = args.beta.present() ? beta : nullptr;
  for (int64_t i = 0; i < embed_max; ++i) {
    if (g) gamma[i] = args.gamma[i];
    if (b) beta[i] = args.beta[i];
  }
  const int64_t grain = max64(1, 16384 / max64(width, 1));  // rows per chunk: enough work to pay a thread
  parallel_for(groups * rows, grain, args.threads, [&](int64_t begin, int64_t end) {
    float* contiguous = scratch(Slot::kTile, width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = t / rows, r = t % rows, d = args.embed[k];
      const float* x = args.x.data + k * args.x.strides[0] + r * args.x.strides[1];
      if (args.x.strides[2] != 1) {
        for (int64_t i = 0; i < d; ++i) contiguous[i] = x[i * args.x.strides[2]];
        x = contiguous;
      }
      float* y = args.y.data + k * args.y.strides[0] + r * args.y.strides[1];
      layer_norm_row(x, d, g, b, args.eps, y);
      zero_columns(y, d, width);
    }
  });
}

// --- MLP ---------------------------------------------------------------------------------------

// Per task (subnet, kMlpRowChunk rows): fc1 + GELU into a tile that stays in L2, then fc2 from it.
void mlp(const MlpArgs& args) {
  int64_t embed_max = 0, hidden_max = 0;
  for (int32_t e : args.embed) embed_max = max64(embed_max, e);
  for (int32_t h : args.hidden) hidden_max = max64(hidden_max, h);
  const Matrix w1{args.w1.data, hidden_max, embed_max, args.w1.stride_row, args.w1.stride_col};
  const Matrix w2{args.w2.data, embed_max, hidden_max, args.w2.stride_row, args.w2.stride_col};
  const Panels fc1 = pack_weight(w1, scratch(Slot::kShared0, padded_cols(hidden_max) * embed_max), args.threads);
  const Panels fc2 = pack_weight(w2, scratch(Slot::kShared1, padded_cols(embed_max) * hidden_max), args.threads);
  float* biases = scratch(Slot::kShared2, padded_cols(hidden_max) + padded_cols(embed_max));
  Epilogue ep1, ep2;
  ep1.bias = pack_bias(args.b1, hidden_max, biases);
  ep1.gelu = true;
  ep2.bias = pack_bias(args.b2, embed_max, biases + padded_cols(hidden_max));

  const int64_t groups = args.x.dims[0], rows = args.x.dims[1], width = args.y.dims[2];
  const int64_t chunks = ceil_div(rows, kMlpRowChunk);
  const int64_t hidden_ld = padded_cols(hidden_max);
  parallel_for(groups * chunks, 1, args.threads, [&](int64_t begin, int64_t end) {
    float* hidden = scratch(Slot::kTile, kMlpRowChunk * hidden_ld);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / chunks, r0 = task % chunks * kMlpRowChunk, n = min64(kMlpRowChunk, rows - r0);
      const int64_t e = args.embed[k], h = args.hidden[k];
      const Matrix xk = args.x.slice(k);
      const Panels fc1k = fc1.leading(e, h), fc2k = fc2.leading(h, e);
      gemm(Matrix{xk.row(r0), n, e, xk.stride_row, xk.stride_col}, fc1k, 0, fc1k.count(), ep1, hidden, hidden_ld);
      float* y = args.y.data + k * args.y.strides[0] + r0 * args.y.strides[1];
      gemm(Matrix{hidden, n, h, hidden_ld, 1}, fc2k, 0, fc2k.count(), ep2, y, args.y.strides[1]);
      for (int64_t r = 0; r < n; ++r) zero_columns(y + r * args.y.strides[1], e, width);
    }
  });
}

// --- attention ---------------------------------------------------------------------------------

// softmax over s[:n] in place.
inline void softmax_row(float* s, int64_t n) {
  vfloat m = vbroadcast(-3.402823466e38f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) m = vmax(m, vload(s + i));
  float row_max = vreduce_max(m);
  for (; i < n; ++i) row_max = s[i] > row_max ? s[i] : row_max;
  const vfloat vm = vbroadcast(row_max);
  vfloat sum = vzero();
  for (i = 0; i < n; i += kLanes) {
    const int c = static_cast<int>(min64(kLanes, n - i));
    const vfloat e = vexp(vsub(vload_n(s + i, c), vm));
    vstore_n(s + i, e, c);
    sum = vadd(sum, c == kLanes ? e : vload_n(s + i, c));
  }
  const vfloat inv = vbroadcast(1.0f / vreduce_add(sum));
  for (i = 0; i < n; i += kLanes) {
    const int c = static_cast<int>(min64(kLanes, n - i));
    vstore_n(s + i, vmul(vload_n(s + i, c), inv), c);
  }
}

// Two phases. (1) Per (batch entry, head), on one thread: that head's q, k, v (one GEMM against the
// head's packed qkv panels), scores, softmax and scores @ v, into the head's columns of a shared
// context buffer; nothing of size tokens^2 leaves the thread's L2. (2) The output projection of the
// context rows, tasks over (subnet, row chunk, column group).
void attention(const AttentionArgs& args) {
  const int64_t entries = args.x.dims[0], tokens = args.x.dims[1], width = args.y.dims[2];
  const int64_t dh = args.head_dim, groups = entries / args.batch;
  int64_t embed_max = 0, heads_max = 0;
  for (int32_t e : args.embed) embed_max = max64(embed_max, e);
  for (int32_t h : args.heads) heads_max = max64(heads_max, h);

  // qkv panels grouped by head: head h owns columns [q_h | k_h | v_h] = 3 * dh, padded to whole panels.
  const int64_t head_cols = 3 * dh, head_panels = ceil_div(head_cols, kNR);
  const int64_t head_stride = head_panels * kNR * embed_max;
  float* qkv_packed = scratch(Slot::kShared0, heads_max * head_stride);
  float* qkv_bias = scratch(Slot::kShared2, heads_max * head_panels * kNR + padded_cols(embed_max));
  const int64_t block_rows = args.max_heads * dh;  // rows of one of the q, k, v blocks of the super weight
  auto qkv_row = [&](int64_t head, int64_t c) { return (c / dh) * block_rows + head * dh + c % dh; };
  parallel_for(heads_max * head_panels, 1, args.threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t head = t / head_panels, p = t % head_panels;
      pack_panels([&](int64_t c) { return args.qkv_w.row(qkv_row(head, c)); }, args.qkv_w.stride_col, embed_max,
                  head_cols, qkv_packed + head * head_stride, p, p + 1);
    }
  });
  if (args.qkv_b.present()) {
    for (int64_t head = 0; head < heads_max; ++head)
      for (int64_t c = 0; c < head_panels * kNR; ++c)
        qkv_bias[head * head_panels * kNR + c] = c < head_cols ? args.qkv_b[qkv_row(head, c)] : 0.0f;
  }
  const Matrix proj_w{args.proj_w.data, embed_max, heads_max * dh, args.proj_w.stride_row, args.proj_w.stride_col};
  const Panels proj = pack_weight(proj_w, scratch(Slot::kShared1, padded_cols(embed_max) * heads_max * dh), args.threads);

  // Phase 1: context [entries, tokens, heads_max * dh], a head's columns written by its task only.
  const int64_t context_ld = heads_max * dh;
  float* context = scratch(Slot::kShared3, entries * tokens * context_ld);
  const float scale = 1.0f / __builtin_sqrtf(static_cast<float>(dh));
  parallel_for(entries * heads_max, 1, args.threads, [&](int64_t begin, int64_t end) {
    const int64_t qkv_ld = head_cols, scores_ld = padded_cols(tokens);
    float* qkv = scratch(Slot::kTile, tokens * qkv_ld);
    float* keys = scratch(Slot::kKeys, padded_cols(tokens) * dh);
    float* values = scratch(Slot::kValues, padded_cols(dh) * tokens + tokens * scores_ld);
    float* scores = values + padded_cols(dh) * tokens;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t entry = task / heads_max, head = task % heads_max, k = entry / args.batch;
      if (head >= args.heads[k]) continue;  // past this subnet's heads: its projection never reads them
      const int64_t e = args.embed[k];
      const Matrix x = args.x.slice(entry);
      Epilogue ep_qkv;
      ep_qkv.bias = args.qkv_b.present() ? qkv_bias + head * head_panels * kNR : nullptr;
      const Panels w_head{qkv_packed + head * head_stride, e, head_cols, kNR * embed_max};
      gemm(Matrix{x.data, tokens, e, x.stride_row, x.stride_col}, w_head, 0, head_panels, ep_qkv, qkv, qkv_ld);

      // scores = q @ k^T * scale: B[d][j] = k[j][d].
      pack_panels([&](int64_t j) { return qkv + j * qkv_ld + dh; }, 1, dh, tokens, keys, 0, ceil_div(tokens, kNR));
      const Panels key_panels{keys, dh, tokens, dh * kNR};
      Epilogue ep_scores;
      ep_scores.scale = scale;
      gemm(Matrix{qkv, tokens, dh, qkv_ld, 1}, key_panels, 0, key_panels.count(), ep_scores, scores, scores_ld);
      for (int64_t i = 0; i < tokens; ++i) softmax_row(scores + i * scores_ld, tokens);

      // context = probabilities @ v: B[j][d] = v[j][d].
      pack_panels([&](int64_t d) { return qkv + 2 * dh + d; }, qkv_ld, tokens, dh, values, 0, ceil_div(dh, kNR));
      const Panels value_panels{values, tokens, dh, tokens * kNR};
      gemm(Matrix{scores, tokens, tokens, scores_ld, 1}, value_panels, 0, value_panels.count(), Epilogue{},
           context + entry * tokens * context_ld + head * dh, context_ld);
    }
  });

  // Phase 2: y = context @ W_o^T + b_o per subnet.
  Epilogue ep_proj;
  ep_proj.bias = pack_bias(args.proj_b, embed_max, qkv_bias + heads_max * head_panels * kNR);
  const int64_t rows = args.batch * tokens;
  const int64_t chunks = ceil_div(rows, kRowChunk);
  const int64_t column_groups = panel_groups(groups * chunks, proj.count(), args.threads);
  const int64_t panels_per_group = ceil_div(proj.count(), column_groups);
  parallel_for(groups * chunks * column_groups, 1, args.threads, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / (chunks * column_groups), chunk = task / column_groups % chunks;
      const int64_t group = task % column_groups;
      const Panels active = proj.leading(args.heads[k] * dh, args.embed[k]);
      const int64_t panel_begin = group * panels_per_group;
      const int64_t panel_end = min64(active.count(), panel_begin + panels_per_group);
      const int64_t r0 = chunk * kRowChunk, n = min64(kRowChunk, rows - r0);
      // Rows of subnet k: batch entries k*batch.., contiguous in the context buffer, strided in y.
      for (int64_t r = r0; r < r0 + n;) {
        const int64_t entry = k * args.batch + r / tokens, t0 = r % tokens, m = min64(tokens - t0, r0 + n - r);
        float* y = args.y.data + entry * args.y.strides[0] + t0 * args.y.strides[1];
        if (panel_begin < panel_end) {
          gemm(Matrix{context + (entry * tokens + t0) * context_ld, m, active.depth, context_ld, 1}, active,
               panel_begin, panel_end, ep_proj, y, args.y.strides[1]);
        }
        if (group == 0) {
          for (int64_t i = 0; i < m; ++i) zero_columns(y + i * args.y.strides[1], args.embed[k], width);
        }
        r += m;
      }
    }
  });
}

}  // namespace ELASTIC_ISA

const KernelTable* ELASTIC_TABLE_FUNCTION() {
  static const KernelTable table{ELASTIC_ISA_NAME, &ELASTIC_ISA::linear, &ELASTIC_ISA::layer_norm, &ELASTIC_ISA::mlp,
                                 &ELASTIC_ISA::attention};
  return &table;
}

}  // namespace elastic
