// Python bindings of the native kernels. Every entry point releases the GIL around its loops.
#include "kernels.h"

namespace py = pybind11;
using namespace elastic;

namespace {

void linear_forward_binding(const py::tuple& x, const py::tuple& w, const py::object& b, const py::tuple& y,
                            bool apply_gelu) {
  Matrix xm = matrix_from(x, "x"), wm = matrix_from(w, "weight"), ym = matrix_from(y, "out");
  Vector bv = vector_from(b, "bias");
  require(wm.cols == xm.cols, "linear_forward: weight slice and x disagree on in_features");
  require(ym.rows == xm.rows && ym.cols == wm.rows, "linear_forward: output shape mismatch");
  require(!bv.present() || bv.size == wm.rows, "linear_forward: bias slice has the wrong size");
  py::gil_scoped_release release;
  linear_forward(xm, wm, bv, ym, apply_gelu);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "elastic-ops native CPU kernels (float32, strided views of super weights)";
  m.def("linear_forward", &linear_forward_binding, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("out"), py::arg("apply_gelu") = false,
        "y[:, :out] = x @ W[:out, :in]^T + b[:out] (optionally GELU), all float32 strided views");
}
