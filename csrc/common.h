// Shared plumbing of the native CPU kernels.
//
// Tensors cross from Python as (data pointer, shape, element strides). Python validates dtype,
// device, shapes and bounds before calling (elastic_ops/_native.py); the checks here only guard
// the invariants a kernel relies on, so a bug on the Python side becomes an exception, not a crash.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace elastic {

namespace py = pybind11;

// A strided view of a float32 matrix: a slice of a super weight or a batch of activations.
struct Matrix {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t stride_row = 0, stride_col = 0;

  float* row(int64_t r) const { return data + r * stride_row; }
  float& at(int64_t r, int64_t c) const { return data[r * stride_row + c * stride_col]; }
};

// A strided view of a float32 vector (bias, LayerNorm weight), possibly absent.
struct Vector {
  float* data = nullptr;
  int64_t size = 0, stride = 0;

  bool present() const { return data != nullptr; }
  float operator[](int64_t i) const { return data[i * stride]; }
};

inline std::vector<int64_t> as_ints(const py::handle& seq, const char* what, size_t expected) {
  auto items = py::cast<std::vector<int64_t>>(seq);
  if (items.size() != expected) {
    throw std::invalid_argument(std::string(what) + ": expected " + std::to_string(expected) +
                                " entries, got " + std::to_string(items.size()));
  }
  return items;
}

// spec = (data_ptr, (rows, cols), (stride_row, stride_col))
inline Matrix matrix_from(const py::tuple& spec, const char* name) {
  if (spec.size() != 3) throw std::invalid_argument(std::string(name) + ": expected (ptr, shape, strides)");
  auto ptr = py::cast<uintptr_t>(spec[0]);
  auto shape = as_ints(spec[1], name, 2);
  auto strides = as_ints(spec[2], name, 2);
  if (ptr == 0) throw std::invalid_argument(std::string(name) + ": null data pointer");
  if (shape[0] < 0 || shape[1] < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  return Matrix{reinterpret_cast<float*>(ptr), shape[0], shape[1], strides[0], strides[1]};
}

// spec = None or (data_ptr, (size,), (stride,))
inline Vector vector_from(const py::object& spec, const char* name) {
  if (spec.is_none()) return Vector{};
  auto tup = py::cast<py::tuple>(spec);
  if (tup.size() != 3) throw std::invalid_argument(std::string(name) + ": expected (ptr, shape, strides)");
  auto ptr = py::cast<uintptr_t>(tup[0]);
  auto shape = as_ints(tup[1], name, 1);
  auto strides = as_ints(tup[2], name, 1);
  if (ptr == 0) throw std::invalid_argument(std::string(name) + ": null data pointer");
  return Vector{reinterpret_cast<float*>(ptr), shape[0], strides[0]};
}

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

// Runs body(begin, end) over [0, n) split in contiguous chunks across the hardware threads.
// Chunks are at least `grain` long so that small problems stay on the calling thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, Body&& body) {
  if (n <= 0) return;
  int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  int64_t workers = std::min<int64_t>(hw, std::max<int64_t>(1, n / std::max<int64_t>(1, grain)));
  if (workers == 1) {
    body(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  int64_t chunk = (n + workers - 1) / workers;
  for (int64_t w = 1; w < workers; ++w) {
    int64_t begin = w * chunk, end = std::min(n, begin + chunk);
    if (begin < end) pool.emplace_back([&body, begin, end] { body(begin, end); });
  }
  body(int64_t{0}, std::min(n, chunk));
  for (auto& t : pool) t.join();
}

}  // namespace elastic
