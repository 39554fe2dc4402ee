// Python bindings of the native kernels (elastic_ops._C). Internal: the checked entry points are in
// elastic_ops/_native.py, which builds every (pointer, shape, strides) spec from a live tensor.
//
// The checks here catch malformed specs (wrong tuple sizes, null pointers, negative or absurd sizes,
// shapes that disagree, an output that overlaps itself) with an exception; what they cannot check is
// that a pointer really addresses that much memory. Every entry point releases the GIL around its loops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "kernels.h"

namespace py = pybind11;
using namespace elastic;

namespace {

// Like CHECK_ARG(), but the message (string concatenation) is only built when the check fails: these
// checks run on every call and must cost next to nothing when they pass.
#define CHECK_ARG(condition, message)                                   \
  do {                                                                  \
    if (!(condition)) throw std::invalid_argument(std::string(message)); \
  } while (0)

constexpr int64_t kMaxDim = int64_t{1} << 31;       // larger sizes are garbage, not tensors
constexpr int64_t kMaxElements = int64_t{1} << 40;

// `name` and `part` only go into error messages, which are built when a check fails.
int64_t to_int(const py::handle& item, const std::string& name, const char* part) {
  if (!PyLong_Check(item.ptr()) || PyBool_Check(item.ptr())) {
    throw py::type_error(name + part + ": expected an int, got " +
                         std::string(py::str(py::type::of(item).attr("__name__"))));
  }
  const long long value = PyLong_AsLongLong(item.ptr());
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument(name + part + ": int out of range");
  }
  return value;
}

// A tuple or list of exactly `expected` ints.
void ints(const py::handle& seq, const std::string& name, const char* part, size_t expected, int64_t* values) {
  PyObject* obj = seq.ptr();
  if (!PyTuple_Check(obj) && !PyList_Check(obj)) {
    throw py::type_error(name + part + ": expected a tuple or list of " + std::to_string(expected) + " ints");
  }
  const size_t size = static_cast<size_t>(PySequence_Fast_GET_SIZE(obj));
  CHECK_ARG(size == expected, name + part + ": expected " + std::to_string(expected) + " entries, got " +
                                  std::to_string(size));
  for (size_t i = 0; i < size; ++i) values[i] = to_int(PySequence_Fast_GET_ITEM(obj, i), name, part);
}

// spec = (data_ptr, shape, strides) with `rank` dimensions.
float* parse(const py::handle& spec, const std::string& name, size_t rank, int64_t* dims, int64_t* strides) {
  CHECK_ARG(PyTuple_Check(spec.ptr()) && PyTuple_GET_SIZE(spec.ptr()) == 3, name + ": expected a (ptr, shape, strides) tuple");
  PyObject* tup = spec.ptr();
  const int64_t ptr = to_int(PyTuple_GET_ITEM(tup, 0), name, " pointer");
  ints(PyTuple_GET_ITEM(tup, 1), name, " shape", rank, dims);
  ints(PyTuple_GET_ITEM(tup, 2), name, " strides", rank, strides);
  int64_t elements = 1;
  for (size_t i = 0; i < rank; ++i) {
    CHECK_ARG(dims[i] >= 0 && dims[i] < kMaxDim, name + ": size " + std::to_string(dims[i]) + " is out of range");
    CHECK_ARG(strides[i] >= 0 && strides[i] < kMaxElements,
              name + ": stride " + std::to_string(strides[i]) + " is out of range");
    elements *= dims[i];
    CHECK_ARG(elements < kMaxElements, name + ": too many elements");
  }
  // torch gives an empty tensor a null pointer; nothing reads an empty tensor.
  CHECK_ARG(ptr >= 0, name + ": negative data pointer");
  CHECK_ARG(ptr != 0 || elements == 0, name + ": null data pointer");
  CHECK_ARG(ptr % alignof(float) == 0, name + ": data pointer is not aligned for float32");
  return reinterpret_cast<float*>(static_cast<uintptr_t>(ptr));
}

Matrix matrix(const py::handle& spec, const std::string& name) {
  Matrix m;
  int64_t dims[2], strides[2];
  m.data = parse(spec, name, 2, dims, strides);
  m.rows = dims[0];
  m.cols = dims[1];
  m.stride_row = strides[0];
  m.stride_col = strides[1];
  return m;
}

Vector vector(const py::object& spec, const std::string& name) {
  if (spec.is_none()) return Vector{};
  Vector v;
  v.data = parse(spec, name, 1, &v.size, &v.stride);
  return v;
}

Tensor3 tensor3(const py::handle& spec, const std::string& name) {
  Tensor3 t;
  t.data = parse(spec, name, 3, t.dims, t.strides);
  return t;
}

// An output must not overlap itself: the kernels' threads write disjoint rows. width < 0: any width.
Tensor3 output(const py::handle& spec, const Tensor3& x, int64_t width) {
  Tensor3 y = tensor3(spec, "out");
  CHECK_ARG(y.dims[0] == x.dims[0] && y.dims[1] == x.dims[1] && (width < 0 || y.dims[2] == width),
          "out: shape (" + std::to_string(y.dims[0]) + ", " + std::to_string(y.dims[1]) + ", " +
              std::to_string(y.dims[2]) + ") does not match the input's leading dims and width");
  CHECK_ARG(y.strides[2] == 1, "out: columns must be contiguous (stride 1)");
  CHECK_ARG(y.dims[1] <= 1 || y.strides[1] >= y.dims[2], "out: rows overlap");
  CHECK_ARG(y.dims[0] <= 1 || y.strides[0] >= y.dims[1] * y.strides[1], "out: batch entries overlap");
  return y;
}

Sizes sizes(const py::handle& seq, const char* what, int64_t count, int64_t maximum) {
  CHECK_ARG(count >= 0 && count < kMaxDim, std::string(what) + ": bad subnet count");
  std::vector<int64_t> values(static_cast<size_t>(count));
  ints(seq, what, "", values.size(), values.data());
  Sizes result(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    CHECK_ARG(values[i] >= 1 && values[i] <= maximum,
              std::string(what) + ": " + std::to_string(values[i]) + " is outside 1.." + std::to_string(maximum));
    result[i] = static_cast<int32_t>(values[i]);
  }
  return result;
}

int64_t largest(const Sizes& values) {
  int64_t m = 0;
  for (int32_t v : values) m = max64(m, v);
  return m;
}

void check_vector(const Vector& v, const std::string& name, int64_t needed) {
  CHECK_ARG(!v.present() || v.size >= needed,
          name + ": has " + std::to_string(v.size) + " entries, needs " + std::to_string(needed));
}

int thread_count(int threads) {
  CHECK_ARG(threads >= 1, "threads must be >= 1");
  return threads > 1024 ? 1024 : threads;
}

bool empty(const Tensor3& x) { return x.dims[0] == 0 || x.dims[1] == 0; }

void linear_forward(const py::handle& x, const py::handle& weight, const py::object& bias, const py::handle& out_sizes,
                    const py::handle& out, bool apply_gelu, int threads) {
  LinearArgs args;
  args.x = tensor3(x, "x");
  args.w = matrix(weight, "weight");
  args.b = vector(bias, "bias");
  CHECK_ARG(args.w.cols >= args.x.dims[2], "linear_forward: weight has " + std::to_string(args.w.cols) +
                                             " columns, fewer than x's " + std::to_string(args.x.dims[2]) +
                                             " features");
  CHECK_ARG(args.x.dims[2] >= 1, "linear_forward: x has no features");
  args.w.cols = args.x.dims[2];  // the active columns W[:, :in] of a super weight (the active rows: out_sizes)
  args.out = sizes(out_sizes, "out_sizes", args.x.dims[0], args.w.rows);
  check_vector(args.b, "bias", largest(args.out));
  args.y = output(out, args.x, -1);
  CHECK_ARG(args.y.dims[2] >= largest(args.out), "out: narrower than the largest out size");
  args.gelu = apply_gelu;
  args.threads = thread_count(threads);
  if (empty(args.x)) return;
  py::gil_scoped_release release;
  active_table().linear(args);
}

void layer_norm_forward(const py::handle& x, const py::object& weight, const py::object& bias,
                        const py::handle& embed_sizes, float eps, const py::handle& out, int threads) {
  LayerNormArgs args;
  args.x = tensor3(x, "x");
  args.gamma = vector(weight, "weight");
  args.beta = vector(bias, "bias");
  args.embed = sizes(embed_sizes, "embed_sizes", args.x.dims[0], args.x.dims[2]);
  check_vector(args.gamma, "weight", largest(args.embed));
  check_vector(args.beta, "bias", largest(args.embed));
  CHECK_ARG(eps >= 0.0f, "layer_norm_forward: eps must be >= 0");
  args.eps = eps;
  args.y = output(out, args.x, args.x.dims[2]);
  args.threads = thread_count(threads);
  if (empty(args.x)) return;
  py::gil_scoped_release release;
  active_table().layer_norm(args);
}

void mlp_forward(const py::handle& x, const py::handle& fc1_weight, const py::object& fc1_bias,
                 const py::handle& fc2_weight, const py::object& fc2_bias, const py::handle& embed_sizes,
                 const py::handle& hidden_sizes, const py::handle& out, int threads) {
  MlpArgs args;
  args.x = tensor3(x, "x");
  args.w1 = matrix(fc1_weight, "fc1_weight");
  args.b1 = vector(fc1_bias, "fc1_bias");
  args.w2 = matrix(fc2_weight, "fc2_weight");
  args.b2 = vector(fc2_bias, "fc2_bias");
  const int64_t width = args.x.dims[2];
  args.embed = sizes(embed_sizes, "embed_sizes", args.x.dims[0], min64(width, min64(args.w1.cols, args.w2.rows)));
  args.hidden = sizes(hidden_sizes, "hidden_sizes", args.x.dims[0], min64(args.w1.rows, args.w2.cols));
  check_vector(args.b1, "fc1_bias", largest(args.hidden));
  check_vector(args.b2, "fc2_bias", largest(args.embed));
  args.y = output(out, args.x, width);
  args.threads = thread_count(threads);
  if (empty(args.x)) return;
  py::gil_scoped_release release;
  active_table().mlp(args);
}

void attention_forward(const py::handle& x, int64_t batch, const py::handle& qkv_weight, const py::object& qkv_bias,
                       const py::handle& proj_weight, const py::object& proj_bias, int64_t max_heads,
                       int64_t head_dim, const py::handle& embed_sizes, const py::handle& head_counts,
                       const py::handle& out, int threads) {
  AttentionArgs args;
  args.x = tensor3(x, "x");
  CHECK_ARG(batch >= 1 && args.x.dims[0] % batch == 0, "attention_forward: batch must be >= 1 and divide x.shape[0]");
  CHECK_ARG(head_dim >= 1 && head_dim < 65536, "attention_forward: head_dim is out of range");
  CHECK_ARG(max_heads >= 1 && max_heads < 65536, "attention_forward: max_heads is out of range");
  args.batch = batch;
  args.head_dim = head_dim;
  args.max_heads = max_heads;
  args.qkv_w = matrix(qkv_weight, "qkv_weight");
  args.qkv_b = vector(qkv_bias, "qkv_bias");
  args.proj_w = matrix(proj_weight, "proj_weight");
  args.proj_b = vector(proj_bias, "proj_bias");
  CHECK_ARG(args.qkv_w.rows == 3 * max_heads * head_dim,
          "qkv_weight: expected 3 * max_heads * head_dim = " + std::to_string(3 * max_heads * head_dim) + " rows");
  check_vector(args.qkv_b, "qkv_bias", 3 * max_heads * head_dim);
  const int64_t groups = args.x.dims[0] / batch, width = args.x.dims[2];
  args.embed = sizes(embed_sizes, "embed_sizes", groups, min64(width, min64(args.qkv_w.cols, args.proj_w.rows)));
  args.heads = sizes(head_counts, "head_counts", groups, min64(max_heads, args.proj_w.cols / head_dim));
  check_vector(args.proj_b, "proj_bias", largest(args.embed));
  args.y = output(out, args.x, width);
  args.threads = thread_count(threads);
  if (empty(args.x)) return;
  py::gil_scoped_release release;
  active_table().attention(args);
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const KernelTable* table : supported_tables()) names.emplace_back(table->isa);
  return names;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "elastic-ops native CPU kernels (float32, strided views of super weights). Internal: call them through "
      "elastic_ops._native, which checks the tensors; a spec here is (data_ptr, shape, strides) and is trusted "
      "to address that much memory.";
  m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out_sizes"),
        py::arg("out"), py::arg("apply_gelu"), py::arg("threads"),
        "out[k, r, :o_k] = act(x[k, r] @ weight[:o_k, :in]^T + bias[:o_k]), zero past o_k; x [K, rows, in], weight "
        "[>= o_max, >= in]");
  m.def("layer_norm_forward", &layer_norm_forward, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("embed_sizes"), py::arg("eps"), py::arg("out"), py::arg("threads"),
        "LayerNorm of x[k, r, :e_k] with weight[:e_k], bias[:e_k], zero past e_k; x [K, rows, width]");
  m.def("mlp_forward", &mlp_forward, py::arg("x"), py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("fc2_weight"),
        py::arg("fc2_bias"), py::arg("embed_sizes"), py::arg("hidden_sizes"), py::arg("out"), py::arg("threads"),
        "fc2(gelu(fc1(x))) per subnet with W1[:h_k, :e_k], W2[:e_k, :h_k], fused per block of rows");
  m.def("attention_forward", &attention_forward, py::arg("x"), py::arg("batch"), py::arg("qkv_weight"),
        py::arg("qkv_bias"), py::arg("proj_weight"), py::arg("proj_bias"), py::arg("max_heads"), py::arg("head_dim"),
        py::arg("embed_sizes"), py::arg("head_counts"), py::arg("out"), py::arg("threads"),
        "self-attention per subnet (block qkv layout), x [K * batch, tokens, width]");
  m.def("isa", [] { return std::string(active_table().isa); }, "instruction set the kernels run on");
  m.def("available_isas", &available_isas, "instruction sets this CPU can run, best first");
  m.def("select_isa", [](const std::string& name) { select_isa(name); }, py::arg("name"),
        "run the kernels on another supported instruction set (for tests and benchmarks)");
}
