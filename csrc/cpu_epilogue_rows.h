// The row kernels of the fused CPU epilogue (cpu_epilogue.h), in the namespace ARCFACE_CPU_ISA,
// with at::vec::Vectorized of whatever instruction set the including file selected. Included once
// per instruction set: see cpu_epilogue.cpp and cpu_epilogue_avx2.cpp.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_epilogue.h"

#ifndef ARCFACE_CPU_ISA
#error "define ARCFACE_CPU_ISA (the namespace of this copy) before including cpu_epilogue_rows.h"
#endif

namespace arcface_kernels::cpu_rows::ARCFACE_CPU_ISA {
namespace {

template <typename T>
T max_nan(T a, T b) {  // torch.maximum: NaN wins
  if (std::isnan(a)) return a;
  if (std::isnan(b)) return b;
  return a > b ? a : b;
}

// Horizontal reduction of a vector's lanes in lane order (fixed: deterministic).
template <typename T, typename Op>
T reduce_lanes(const at::vec::Vectorized<T>& v, T init, Op op) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  for (int64_t i = 0; i < at::vec::Vectorized<T>::size(); ++i) init = op(init, lanes[i]);
  return init;
}

template <typename T>
T row_max(const T* row, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  int64_t j = 0;
  T best = -std::numeric_limits<T>::infinity();
  if (n >= step) {
    Vec acc = Vec::loadu(row);
    for (j = step; j + step <= n; j += step) acc = at::vec::maximum(acc, Vec::loadu(row + j));
    best = reduce_lanes(acc, best, max_nan<T>);
  }
  for (; j < n; ++j) best = max_nan(best, row[j]);
  return best;
}

// The first index holding `value` (the first NaN when it is NaN): torch.argmax's choice.
template <typename T>
int64_t first_index(const T* row, int64_t n, T value) {
  const bool nan = std::isnan(value);
  for (int64_t j = 0; j < n; ++j) {
    if (nan ? std::isnan(row[j]) : row[j] == value) return j;
  }
  return 0;
}

template <typename T>
T row_sum(const T* row, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  Vec acc(T(0));
  int64_t j = begin;
  for (; j + step <= end; j += step) acc = acc + Vec::loadu(row + j);
  T total = reduce_lanes(acc, T(0), [](T a, T b) { return a + b; });
  for (; j < end; ++j) total += row[j];
  return total;
}

// sum_j exp(row_j - shift), with torch's vectorized exp (Sleef) on every entry, the tail included;
// Store: each row_j becomes its exp(row_j - shift) as well (the same values, the same sum).
template <bool Store, typename T>
T row_sum_exp(T* row, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  const Vec s(shift);
  Vec acc(T(0));
  int64_t j = 0;
  for (; j + step <= n; j += step) {
    const Vec e = (Vec::loadu(row + j) - s).exp();
    if constexpr (Store) e.store(row + j);
    acc = acc + e;
  }
  T total = reduce_lanes(acc, T(0), [](T a, T b) { return a + b; });
  if (j < n) {
    alignas(64) T tail[Vec::size()];
    const Vec e = (Vec::loadu(row + j, n - j) - s).exp();
    e.store(tail);
    if constexpr (Store) e.store(row + j, n - j);
    for (int64_t i = 0; i < n - j; ++i) total += tail[i];
  }
  return total;
}

// row_j *= scale_j r, in place (r = 1: the tile holds xs . w_j; else bf16_gemm's x . w_j, r = s rx_i).
template <typename T>
void scale_columns(T* row, const T* scale, int64_t n, T r) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  const Vec vr(r);
  int64_t j = 0;
  for (; j + step <= n; j += step) (Vec::loadu(row + j) * Vec::loadu(scale + j) * vr).store(row + j);
  for (; j < n; ++j) row[j] = row[j] * scale[j] * r;
}

// row_j = f(row_j, scale_j), in place, with f on vectors (the tail a partial vector).
template <typename T, typename F>
void map_scaled_row(T* row, const T* scale, int64_t n, const F& f) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  int64_t j = 0;
  for (; j + step <= n; j += step) f(Vec::loadu(row + j), Vec::loadu(scale + j)).store(row + j);
  if (j < n) f(Vec::loadu(row + j, n - j), Vec::loadu(scale + j, n - j)).store(row + j, n - j);
}

// row_j = (exp(row_j scale_j r - shift) - smooth) scale_j, in place (r as in scale_columns).
template <typename T>
void scaled_exp_minus(T* row, const T* scale, int64_t n, T shift, T smooth, T r) {
  using Vec = at::vec::Vectorized<T>;
  const Vec e(smooth), s(shift), vr(r);
  map_scaled_row(row, scale, n, [&](const Vec& z, const Vec& c) { return ((z * c * vr - s).exp() - e) * c; });
}

// row_j = (row_j k - smooth) scale_j, in place: on the row-block walk's tile of exp(z_j - shift)
// (forward_rows' exp_shift) with k = exp(shift - lse), P = exp(z_j - lse) - smooth times rw_j,
// without a second exp per entry (docs/backends/torch.md, "Gradients in forward").
template <typename T>
void rescaled_minus(T* row, const T* scale, int64_t n, T k, T smooth) {
  using Vec = at::vec::Vectorized<T>;
  const Vec e(smooth), vk(k);
  map_scaled_row(row, scale, n, [&](const Vec& x, const Vec& c) { return (x * vk - e) * c; });
}

// row_j = exp(row_j) - smooth, in place.
template <typename T>
void exp_minus(T* row, int64_t n, T smooth) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  const Vec e(smooth);
  int64_t j = 0;
  for (; j + step <= n; j += step) (Vec::loadu(row + j).exp() - e).store(row + j);
  if (j < n) (Vec::loadu(row + j, n - j).exp() - e).store(row + j, n - j);
}

// Eq. (N1) in logit units (HardMap) on a row whose target entry is -inf (never hard): row_j <-
// (A row_j + B) row_j + E where row_j > threshold, in place; returns the mapped row's max (NaN wins).
template <typename T>
T map_hard(T* row, int64_t n, T threshold, const T* coeffs) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  const T a = coeffs[0], b = coeffs[1], e = coeffs[2];
  const Vec va(a), vb(b), ve(e), vt(threshold);
  T best = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  if (n >= step) {
    Vec acc(best);
    for (; j + step <= n; j += step) {
      const Vec z = Vec::loadu(row + j);
      const Vec mapped = Vec::blendv(z, (z * va + vb) * z + ve, z > vt);
      mapped.store(row + j);
      acc = at::vec::maximum(acc, mapped);
    }
    best = reduce_lanes(acc, best, max_nan<T>);
  }
  for (; j < n; ++j) {
    const T z = row[j];
    if (z > threshold) row[j] = (z * a + b) * z + e;
    best = max_nan(best, row[j]);
  }
  return best;
}

// The backward row with the non-target epilogue (HardMap): z = row_j (times scale_j when scale is
// given), row_j <- (exp(map(z) - lse) - smooth) slope(z) (times scale_j), with map and slope those
// of eqs. (N1)-(N2) on the entries z > threshold (the caller patches the target entry after).
template <typename T>
void mapped_exp_minus(T* row, const T* scale, int64_t n, T lse, T smooth, T threshold, const T* coeffs) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size();
  const T a = coeffs[0], b = coeffs[1], e = coeffs[2];
  const Vec va(a), vb(b), ve(e), va2(a + a), vt(threshold), one(T(1)), eps(smooth), l(lse);
  for (int64_t j = 0; j < n; j += step) {
    const int64_t count = std::min<int64_t>(step, n - j);
    const Vec c = scale ? Vec::loadu(scale + j, count) : one;
    const Vec z = scale ? Vec::loadu(row + j, count) * c : Vec::loadu(row + j, count);
    const Vec hard = z > vt;
    const Vec mapped = Vec::blendv(z, (z * va + vb) * z + ve, hard);
    const Vec p = ((mapped - l).exp() - eps) * Vec::blendv(one, z * va2 + vb, hard);
    (scale ? p * c : p).store(row + j, count);
  }
}

}  // namespace

// The forward loop body of chunked.py, per row: the target entry read and set to -inf (the tile
// is scratch), the non-target max, the top-1 of the plain logits (the lowest class on ties; the
// argmax searched only when the chunk improves the row's best; NaN counts as the largest, as in
// torch.argmax), the online log-sum-exp update shifted by max(running max, chunk max) (an all -inf
// row adds 0) and the smoothing logit sum. Mapped: the non-target epilogue (HardMap) rewrites the
// row after the top-1 (which stays on the plain logits), before the log-sum-exp and the logit sum.
// With exp_shift (the row-block walk, plain path), the log-sum-exp pass leaves exp(z_j - shift) in
// the row and the shift in exp_shift.
template <typename T, bool Mapped>
void forward_rows(const ForwardRows& args, int64_t begin, int64_t end) {
  const int64_t width = args.width;
  T *mx = static_cast<T*>(args.nt_max), *sum = static_cast<T*>(args.nt_sum), *bz = static_cast<T*>(args.best_z);
  T *tz = static_cast<T*>(args.target_z), *ls = static_cast<T*>(args.logit_sum);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  T* shift_out = static_cast<T*>(args.exp_shift);
  for (int64_t i = begin; i < end; ++i) {
    T* row = static_cast<T*>(args.tile) + i * width;
    if (args.col_scale) {  // Z = s cos
      scale_columns(row, static_cast<const T*>(args.col_scale), width,
                    args.row_scale ? static_cast<const T*>(args.row_scale)[i] : T(1));
    }
    const int64_t t = args.labels[i] - args.first_class;
    const bool inside = t >= 0 && t < width;
    const T zy = inside ? row[t] : T(0);
    if (inside) row[t] = neg_inf;  // the target's term is kept apart
    const T chunk_max = row_max(row, width);
    const T plain = inside ? max_nan(chunk_max, zy) : chunk_max;
    if (plain > bz[i] || (std::isnan(plain) && !std::isnan(bz[i]))) {
      const int64_t arg = first_index(row, width, chunk_max);
      const bool target_wins = inside && (zy > chunk_max || (zy == chunk_max && t < arg));
      args.best_class[i] = (target_wins ? t : arg) + args.first_class;
      bz[i] = plain;
    }
    T tile_max = chunk_max;
    if constexpr (Mapped) {
      tile_max = map_hard(row, width, static_cast<const T*>(args.hard.threshold)[i],
                          static_cast<const T*>(args.hard.coeffs));
    }
    if (args.smoothing) ls[i] += inside ? row_sum(row, 0, t) + row_sum(row, t + 1, width) : row_sum(row, 0, width);
    const T new_max = max_nan(mx[i], tile_max);
    const T shift = new_max == neg_inf ? T(0) : new_max;
    const T chunk_sum = shift_out ? row_sum_exp<true>(row, width, shift) : row_sum_exp<false>(row, width, shift);
    if (shift_out) shift_out[i] = shift;
    sum[i] = sum[i] * std::exp(mx[i] - shift) + chunk_sum;
    mx[i] = new_max;
    if (inside) tz[i] = zy;
  }
}

// The backward loop body of chunked.py: P = exp(Z - lse) - eps / C (eq. (15)), the target entry
// patched; Mapped: times dh/dc on the hard entries (mapped_exp_minus); exp_scale: from the tile of
// exponentials forward_rows left (rescaled_minus).
template <typename T, bool Mapped>
void backward_rows(const BackwardRows& args, int64_t begin, int64_t end) {
  const T eps = static_cast<T>(args.smooth);
  const T* target_p = static_cast<const T*>(args.target_p);
  const T* scale = static_cast<const T*>(args.col_scale);
  for (int64_t i = begin; i < end; ++i) {
    T* row = static_cast<T*>(args.tile) + i * args.width;
    if constexpr (Mapped) {
      mapped_exp_minus(row, scale, args.width, static_cast<const T*>(args.lse)[i], eps,
                       static_cast<const T*>(args.hard.threshold)[i], static_cast<const T*>(args.hard.coeffs));
    } else if (args.exp_scale) {
      rescaled_minus(row, scale, args.width, static_cast<const T*>(args.exp_scale)[i], eps);
    } else if (scale) {
      const T r = args.row_scale ? static_cast<const T*>(args.row_scale)[i] : T(1);
      scaled_exp_minus(row, scale, args.width, static_cast<const T*>(args.lse)[i], eps, r);
    } else {
      exp_minus(row, args.width, eps);
    }
    const int64_t t = args.labels[i] - args.first_class;
    if (t >= 0 && t < args.width) row[t] = scale ? target_p[i] * scale[t] : target_p[i];
  }
}

// dW of a chunk's class rows (eq. (24) with ws = rw w): a_j <- rw_j a_j (in place), out_j = a_j -
// projected_j (ws_j . a_j) ws_j, rounded once from T into O. With raw_w (ws = w, a = A_c already):
// out_j = a_j - projected_j rw_j^2 (w_j . a_j) w_j, the same quantity; ws of dtype W (bfloat16
// operands' raw rows: each row is widened into T first).
template <typename T, typename W, typename O>
void project_rows(const ProjectRows& args, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t step = Vec::size(), dim = args.dim;
  const T *r = static_cast<const T*>(args.rw), *proj = static_cast<const T*>(args.projected);
  std::vector<T> widened(std::is_same_v<W, T> ? 0 : dim);
  for (int64_t i = begin; i < end; ++i) {
    T* ai = static_cast<T*>(args.a) + i * dim;
    const W* w_row = static_cast<const W*>(args.ws) + i * dim;
    const T* wi;
    if constexpr (std::is_same_v<W, T>) {
      wi = w_row;
    } else {
      at::vec::convert(w_row, widened.data(), dim);
      wi = widened.data();
    }
    const Vec ri(args.raw_w ? T(1) : r[i]);
    Vec acc(T(0));
    int64_t j = 0;
    for (; j + step <= dim; j += step) {
      const Vec v = Vec::loadu(ai + j) * ri;
      v.store(ai + j);
      acc = acc + v * Vec::loadu(wi + j);
    }
    T dot = reduce_lanes(acc, T(0), [](T x, T y) { return x + y; });
    for (; j < dim; ++j) {
      if (!args.raw_w) ai[j] *= r[i];
      dot += ai[j] * wi[j];
    }
    const T coef = args.raw_w ? dot * (r[i] * r[i] * proj[i]) : dot * proj[i];
    const Vec c(coef);
    for (j = 0; j + step <= dim; j += step) (Vec::loadu(ai + j) - Vec::loadu(wi + j) * c).store(ai + j);
    for (; j < dim; ++j) ai[j] -= wi[j] * coef;
    O* out = static_cast<O*>(args.out) + i * dim;
    if (static_cast<void*>(out) != static_cast<void*>(ai)) at::vec::convert(ai, out, dim);
  }
}

#define ARCFACE_INSTANTIATE_PROJECT(T, W)                                                      \
  template void project_rows<T, W, float>(const ProjectRows&, int64_t, int64_t);          \
  template void project_rows<T, W, double>(const ProjectRows&, int64_t, int64_t);         \
  template void project_rows<T, W, c10::Half>(const ProjectRows&, int64_t, int64_t);      \
  template void project_rows<T, W, c10::BFloat16>(const ProjectRows&, int64_t, int64_t);

bool vectorized_for_avx2() {
#ifdef CPU_CAPABILITY_AVX2
  return true;
#else
  return false;
#endif
}

#define ARCFACE_INSTANTIATE_ROWS(T, MAPPED)                                      \
  template void forward_rows<T, MAPPED>(const ForwardRows&, int64_t, int64_t); \
  template void backward_rows<T, MAPPED>(const BackwardRows&, int64_t, int64_t);
ARCFACE_INSTANTIATE_ROWS(float, false)
ARCFACE_INSTANTIATE_ROWS(double, false)
ARCFACE_INSTANTIATE_ROWS(float, true)
ARCFACE_INSTANTIATE_ROWS(double, true)
#undef ARCFACE_INSTANTIATE_ROWS
ARCFACE_INSTANTIATE_PROJECT(float, float)
ARCFACE_INSTANTIATE_PROJECT(float, c10::BFloat16)
ARCFACE_INSTANTIATE_PROJECT(double, double)
#undef ARCFACE_INSTANTIATE_PROJECT

}  // namespace arcface_kernels::cpu_rows::ARCFACE_CPU_ISA
