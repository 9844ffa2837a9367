// The row kernels of the fused CPU epilogue (cpu_epilogue.cpp): plain pointers and a row range,
// compiled once per instruction set (cpu_epilogue_rows.h, included by cpu_epilogue.cpp for the
// baseline and by cpu_epilogue_avx2.cpp for AVX2 + FMA); cpu_epilogue.cpp picks one at run time.
#pragma once

#include <cstdint>

namespace arcface_kernels::cpu_rows {

// The non-target epilogue (arcface_kernels/negatives.py, docs/design.md section 3c) in logit units:
// a non-target logit z > threshold_i becomes z (A z + B) + E = s h(z / s) (eq. (N1)) with slope
// 2 A z + B = dh/dc (eq. (N2)), where (A, B, E) = (a / s, b, s e) and threshold_i = s tau_i.
// nullptr pointers: the plain path (the kernels are specialized on it, `Mapped`).
struct HardMap {
  const void* threshold;  // N entries, the compute dtype
  const void* coeffs;     // (A, B, E)
};

// One chunk's tile of logits (N x width, row-major, the compute dtype) and the running row
// statistics that forward_rows folds it into (docs/design.md eq. (10)).
struct ForwardRows {
  void* tile;
  const void* col_scale;  // nullptr, or per column: the tile holds xs . w_j, to be scaled by rw_j first
  const int64_t* labels;
  int64_t first_class, width;
  void *nt_max, *nt_sum, *best_z, *target_z, *logit_sum;
  int64_t* best_class;
  bool smoothing;
  HardMap hard;
  // nullptr, or per row (with col_scale): the tile holds the raw products x_i . w_j of bfloat16
  // operands (bf16_gemm's output), scaled by row_scale_i = s rx_i and rw_j first
  const void* row_scale = nullptr;
  // nullptr, or per row (the plain path; the row-block walk): the log-sum-exp pass leaves each
  // non-target entry's exp(z_j - shift_i) in the tile (0 at the target) and writes the shift here
  void* exp_shift = nullptr;
};

// A tile holding Z - lse, made P = exp(.) - smooth with each row's target entry set to target_p.
// With col_scale, the tile holds xs . w_j instead of Z - lse: P = exp(rw_j xs . w_j - lse_i) - smooth,
// and the tile gets P diag(rw) (target entry target_p * rw_t). With a HardMap, the tile holds Z
// (or xs . w_j with col_scale), lse is given, and the non-target entries become
// (exp(map(Z) - lse) - smooth) dh/dc (times rw_j with col_scale). exp_scale (with col_scale, on
// the plain path): the tile holds exp(z_j - shift_i) as forward_rows left it with exp_shift, and
// exp_scale_i = exp(shift_i - lse_i) makes it P diag(rw) (lse is not read).
struct BackwardRows {
  void* tile;
  const int64_t* labels;
  int64_t first_class, width;
  const void* target_p;
  double smooth;
  const void* col_scale;
  const void* lse;
  HardMap hard;
  const void* exp_scale;
  // nullptr, or per row (with col_scale, on the plain path): the tile holds x_i . w_j of bfloat16
  // operands, the logit being row_scale_i rw_j x_i . w_j (ForwardRows::row_scale)
  const void* row_scale = nullptr;
};

// A chunk's class rows: a (rows x dim, scratch), ws, the inverse norms and projection flags, and
// dW's rows `out` in dW's dtype (`out` may be `a` itself when the dtypes match). raw_w: `ws` holds
// the raw rows w and a is already A_c; ws may then be bfloat16 (project_rows' W).
struct ProjectRows {
  void* a;
  const void* ws;
  const void* rw;
  const void* projected;
  void* out;
  int64_t dim;
  bool raw_w;
};

#define ARCFACE_DECLARE_CPU_ROWS(ISA)                                       \
  namespace ISA {                                                           \
  template <typename T, bool Mapped>                                        \
  void forward_rows(const ForwardRows& args, int64_t begin, int64_t end);   \
  template <typename T, bool Mapped>                                        \
  void backward_rows(const BackwardRows& args, int64_t begin, int64_t end); \
  template <typename T, typename W, typename O>                             \
  void project_rows(const ProjectRows& args, int64_t begin, int64_t end);   \
  bool vectorized_for_avx2();                                               \
  }

ARCFACE_DECLARE_CPU_ROWS(baseline)
ARCFACE_DECLARE_CPU_ROWS(avx2)

}  // namespace arcface_kernels::cpu_rows
