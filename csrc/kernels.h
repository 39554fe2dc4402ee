// Declarations of the native kernels; each lives in its own translation unit.
#pragma once

#include "common.h"

namespace elastic {

void linear_forward(const Matrix& x, const Matrix& w, const Vector& b, const Matrix& y, bool apply_gelu);

}  // namespace elastic
