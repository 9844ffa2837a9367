// What the CPU extension's ops share (cpu_epilogue.cpp, cpu_row_blocks.cpp): which copy of the row
// kernels of cpu_epilogue_rows.h runs, the rows per thread of at::parallel_for, and the check of a
// per-row vector argument.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <string>

#include "cpu_epilogue.h"

namespace arcface_kernels {

// The AVX2 + FMA copy of the row kernels where it was compiled as such and torch's own CPU
// capability (at::get_cpu_capability, which ATEN_CPU_CAPABILITY overrides) is AVX2 or AVX512.
inline bool use_avx2() {
  if (!cpu_rows::avx2::vectorized_for_avx2()) return false;
  const std::string capability = at::get_cpu_capability();
  return capability == "AVX2" || capability == "AVX512";
}

inline int64_t grain(int64_t width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));
}

// Runs a row kernel over `rows` rows on at::parallel_for, its AVX2 or its baseline copy (use_avx2):
// kernel(args, begin, end), rows of `width` entries each.
template <typename Args, typename Avx2, typename Baseline>
void each_row(int64_t rows, int64_t width, const Args& args, Avx2 avx2_kernel, Baseline baseline_kernel) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    avx2 ? avx2_kernel(args, begin, end) : baseline_kernel(args, begin, end);
  });
}

inline void check_vector(const at::Tensor& v, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.scalar_type() == dtype && v.is_contiguous() && v.dim() == 1 &&
                  v.size(0) == rows,
              name, ": a contiguous CPU vector, one entry per row, of dtype ", dtype);
}

}  // namespace arcface_kernels
