// Host build of the epilogue math (margin_math.cuh, row_math.cuh, chunk_size.h) for
// tests/test_cuda_math_host.py: reads float32 records from stdin, writes float32 results to stdout.
//
//   math_harness margin               records (c, m1, m2, m3, easy) -> (phi)
//   math_harness margin_clip          records (c, m1, m2, m3, easy, eps) -> (phi<true>, the clip rule)
//   math_harness slope                records (c, m1, m2, easy, straight_through, clip, eps) -> (dphi_dcos,
//                                     dphi_dcos<true> at eps where clip != 0)
//   math_harness gradient             records (c, is_target, m1, m2, m3, lse, grad, target_dcos, scale,
//                                     smoothing_per_class, easy) -> (z, dcos)
//   math_harness nontarget CLIP       records (c, is_target, tau, a, b, e, m1, m2, m3, lse, grad, target_dcos,
//                                     scale, smoothing_per_class, easy, clip_eps) -> (z, dcos) under the
//                                     non-target epilogue (CLIP 1: phi's clip rule on the target)
//   math_harness class_cosine K       records (rx, K dots, K rw) -> (cos, pick)
//   math_harness stats W S T          rows of W (z, c) pairs; classes in S contiguous segments, each
//                                     accumulated by T strided "threads" merged in order, segments
//                                     merged in order; class 0 is the target
//                                     -> (max, sum_exp, nontarget_sum_exp, logit_sum, best_cos, best_class)
//   math_harness project D V          records (factor, D grad, D v) -> (D out): project_rows_kernel's order
//                                     with V-wide pieces (kLanes lanes, butterfly)
//   math_harness route K              records (dcos, rx, K rw, pick) -> (K entries)
//   math_harness chunk                records (rows, K, classes, workspace bytes) -> (classes per chunk)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../chunk_size.h"
#include "../row_math.cuh"

using namespace arcface_kernels;

namespace {

bool read_record(std::vector<float>& record) {
  return std::fread(record.data(), sizeof(float), record.size(), stdin) == record.size();
}

void write(std::initializer_list<float> values) {
  for (float v : values) std::fwrite(&v, sizeof(float), 1, stdout);
}

RowPartial row_stats(const std::vector<float>& row, int64_t width, int64_t segments, int64_t threads) {
  const int64_t per_segment = (width + segments - 1) / segments;
  RowPartial total = empty_partial();
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t first = s * per_segment, stop = std::min(first + per_segment, width);
    RowPartial segment = empty_partial();
    for (int64_t t = 0; t < threads; ++t) {
      RowPartial thread = empty_partial();
      for (int64_t j = first + t; j < stop; j += threads) add_entry(thread, row[2 * j], row[2 * j + 1], j, j == 0);
      segment = merge(segment, thread);
    }
    total = merge(total, segment);
  }
  return total;
}

// One row as project_rows_kernel computes it: lane l sums pieces l, l + kLanes, ... (piece_dot),
// the lanes' sums are added over the xor butterfly, then projection_terms and every entry
// projected_entry, with the per-row coefficient or the unit row per entry as the kernel branches.
void project_row(const float* grad, const float* v, float factor, int64_t dim, int vec, float* out) {
  float lanes[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    lanes[lane] = 0.f;
    for (int64_t col = int64_t{lane} * vec; col < dim; col += int64_t{kLanes} * vec) {
      lanes[lane] = piece_dot(lanes[lane], grad + col, v + col, vec);
    }
  }
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    float next[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) next[lane] = lanes[lane] + lanes[lane ^ offset];
    std::memcpy(lanes, next, sizeof(lanes));
  }
  for (int lane = 1; lane < kLanes; ++lane) {
    if (std::memcmp(&lanes[lane], &lanes[0], sizeof(float)) != 0) std::abort();  // every lane, the same bits
  }
  const ProjectionTerms t = projection_terms(lanes[0], factor);
  for (int64_t i = 0; i < dim; ++i) {
    out[i] = t.per_row ? projected_entry(grad[i], v[i], t.coef) : projected_entry(grad[i], v[i] * factor, t.along);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* mode = argv[1];
  if (!std::strcmp(mode, "margin")) {
    std::vector<float> r(5);
    while (read_record(r)) write({phi(r[0], r[1], r[2], r[3], r[4] != 0.f)});
  } else if (!std::strcmp(mode, "margin_clip")) {
    std::vector<float> r(6);
    while (read_record(r)) write({phi<true>(r[0], r[1], r[2], r[3], r[4] != 0.f, r[5])});
  } else if (!std::strcmp(mode, "slope")) {
    std::vector<float> r(7);
    while (read_record(r)) {
      const bool easy = r[3] != 0.f, straight = r[4] != 0.f;
      write({r[5] != 0.f ? dphi_dcos<true>(r[0], r[1], r[2], easy, straight, r[6])
                         : dphi_dcos(r[0], r[1], r[2], easy, straight)});
    }
  } else if (!std::strcmp(mode, "gradient")) {
    std::vector<float> r(11);
    while (read_record(r)) {
      const RowTerms row{r[2], r[3], r[4], r[5], r[6], r[7]};
      const LossSettings loss{r[8], r[9], r[10] != 0.f};
      const bool is_target = r[1] != 0.f;
      write({entry_logit(r[0], is_target, row, loss), entry_cosine_gradient(r[0], is_target, row, loss)});
    }
  } else if (!std::strcmp(mode, "nontarget") && argc == 3) {
    const bool clip = std::atoi(argv[2]) != 0;
    std::vector<float> r(16);
    while (read_record(r)) {
      const RowTerms row{r[6], r[7], r[8], r[9], r[10], r[11]};
      const LossSettings loss{r[12], r[13], r[14] != 0.f};
      const RowNegatives hard{r[2], r[3], r[4], r[5]};
      const bool is_target = r[1] != 0.f;
      const float z = clip ? remapped_logit<true>(r[0], is_target, row, loss, hard, r[15])
                           : remapped_logit<false>(r[0], is_target, row, loss, hard);
      write({z, remapped_cosine_gradient(r[0], is_target, row, loss, hard)});
    }
  } else if (!std::strcmp(mode, "class_cosine") && argc == 3) {
    const int k = std::atoi(argv[2]);
    std::vector<float> r(1 + 2 * k);
    while (read_record(r)) {
      int pick;
      const float c = class_cosine(r.data() + 1, r.data() + 1 + k, r[0], 0, k, &pick);
      write({c, static_cast<float>(pick)});
    }
  } else if (!std::strcmp(mode, "stats") && argc == 5) {
    const int64_t width = std::atoll(argv[2]), segments = std::atoll(argv[3]), threads = std::atoll(argv[4]);
    std::vector<float> row(2 * width);
    while (read_record(row)) {
      const RowPartial p = row_stats(row, width, segments, threads);
      write({p.max, p.sum_exp, p.nontarget_sum_exp, p.logit_sum, p.best_cos, static_cast<float>(p.best_class)});
    }
  } else if (!std::strcmp(mode, "project") && argc == 4) {
    const int64_t dim = std::atoll(argv[2]);
    const int vec = std::atoi(argv[3]);
    if (vec < 1 || dim % vec != 0) return 2;
    std::vector<float> r(1 + 2 * dim), out(dim);
    while (read_record(r)) {
      project_row(r.data() + 1, r.data() + 1 + dim, r[0], dim, vec, out.data());
      std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    }
  } else if (!std::strcmp(mode, "route") && argc == 3) {
    const int k = std::atoi(argv[2]);
    std::vector<float> r(3 + k);
    while (read_record(r)) {
      const int pick = static_cast<int>(r[2 + k]);
      for (int i = 0; i < k; ++i) write({routed_gradient(r[0], r[1], r[2 + i], i, pick)});
    }
  } else if (!std::strcmp(mode, "chunk")) {
    std::vector<float> r(4);
    while (read_record(r)) {
      const auto at = [&](int i) { return static_cast<int64_t>(r[i]); };
      write({static_cast<float>(classes_per_chunk(at(0), at(1), at(2), at(3)))});
    }
  } else {
    return 2;
  }
  return 0;
}
