// Classes per chunk of the class walk (forward.cu's partial_stats), in plain C++ so that the host
// harness (tests/test_cuda_math_host.py) checks the same function the extension runs.
#pragma once

#include <algorithm>
#include <cstdint>

namespace arcface_kernels {

// Chunks hold a multiple of this many classes (unless fewer fit): every chunk but the last then
// has a leading dimension that is a multiple of 16 bytes in any dtype (float32 dots, 16-bit G),
// which cuBLAS's TMA kernels need. Python's backends/cuda.CLASS_ALIGN is the same number (the
// backward's chunks; tests/test_cuda_glue.py checks they agree).
constexpr int64_t kClassAlign = 64;

// Classes per chunk so that the float32 dots N x chunk * K fit in `workspace_bytes`, rounded down
// to a multiple of kClassAlign when at least one such multiple fits.
inline int64_t classes_per_chunk(int64_t rows, int64_t sub_centers, int64_t n_classes, int64_t workspace_bytes) {
  const int64_t per_class = std::max<int64_t>(rows, 1) * sub_centers * static_cast<int64_t>(sizeof(float));
  const int64_t classes = std::max<int64_t>(1, std::min(n_classes, workspace_bytes / per_class));
  return classes >= kClassAlign ? classes / kClassAlign * kClassAlign : classes;
}

}  // namespace arcface_kernels
