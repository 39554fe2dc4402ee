// The native kernels' interface: one argument struct per op and a table of entry points per
// instruction set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp), chosen at run time.
//
// Every op is written for a group of K subnets that share one supernet (DESIGN.md section 3,
// batched mode): activations are [K, rows, width] and per-subnet size tables say what is active.
// The single-subnet ops are the case K = 1. Outputs are written in full: columns past a subnet's
// active size are set to zero.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace elastic {

using Sizes = std::vector<int32_t>;  // one active size per subnet

// y[k, r, :out_k] = act(x[k, r, :] @ W[:out_k, :in]^T + b[:out_k]); in = x width = W columns.
struct LinearArgs {
  Tensor3 x;   // [K, rows, in]
  Matrix w;    // [out_max, in]: the super weight's leading block
  Vector b;    // [out_max] or absent
  Sizes out;   // K entries, 1..out_max
  Tensor3 y;   // [K, rows, width >= max(out)], unit column stride
  bool gelu = false;
  int threads = 1;
};

// LayerNorm of x[k, r, :e_k] with gamma[:e_k], beta[:e_k].
struct LayerNormArgs {
  Tensor3 x;      // [K, rows, width]
  Vector gamma;   // [>= max(embed)] or absent
  Vector beta;    // [>= max(embed)] or absent
  Sizes embed;    // K entries, 1..width
  float eps = 1e-5f;
  Tensor3 y;      // [K, rows, width], unit column stride
  int threads = 1;
};

// y[k, r, :e_k] = gelu(x[k, r, :e_k] @ W1[:h_k, :e_k]^T + b1[:h_k]) @ W2[:e_k, :h_k]^T + b2[:e_k].
struct MlpArgs {
  Tensor3 x;     // [K, rows, width]
  Matrix w1;     // [hidden_max, width]
  Vector b1;     // [hidden_max] or absent
  Matrix w2;     // [width, hidden_max]
  Vector b2;     // [width] or absent
  Sizes embed;   // K entries, 1..width
  Sizes hidden;  // K entries, 1..hidden_max
  Tensor3 y;     // [K, rows, width], unit column stride
  int threads = 1;
};

// Self-attention of each subnet with h_k heads of head_dim channels, block qkv layout
// (DESIGN.md section 2), then y = context @ W_o[:e_k, :h_k * head_dim]^T + b_o[:e_k].
struct AttentionArgs {
  Tensor3 x;              // [K * batch, tokens, width]: subnet k owns batch entries k*batch ..
  int64_t batch = 1;
  Matrix qkv_w;           // [3 * max_heads * head_dim, width]
  Vector qkv_b;           // [3 * max_heads * head_dim] or absent
  Matrix proj_w;          // [width, heads_max * head_dim]
  Vector proj_b;          // [width] or absent
  int64_t max_heads = 1;  // heads of the super weight (its block size)
  int64_t head_dim = 64;
  Sizes embed;            // K entries, 1..width
  Sizes heads;            // K entries, 1..proj_w.cols / head_dim
  Tensor3 y;              // [K * batch, tokens, width], unit column stride
  int threads = 1;
};

struct KernelTable {
  const char* isa;
  void (*linear)(const LinearArgs&);
  void (*layer_norm)(const LayerNormArgs&);
  void (*mlp)(const MlpArgs&);
  void (*attention)(const AttentionArgs&);
};

// Each returns nullptr where that instruction set was not compiled in.
const KernelTable* kernel_table_avx512();
const KernelTable* kernel_table_avx2();
const KernelTable* kernel_table_generic();

// Instruction sets this CPU can run, best first; the active one (the best unless select_isa chose).
std::vector<const KernelTable*> supported_tables();
const KernelTable& active_table();
void select_isa(const std::string& name);

}  // namespace elastic
