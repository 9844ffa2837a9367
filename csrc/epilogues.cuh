// Device side shared by the epilogue kernels (forward.cu, backward.cu). They run on a class
// chunk's raw dot products (N x chunk * K, float32, written by a cuBLAS GEMM) on a 2-D grid:
// blockIdx.x is the row, blockIdx.y a segment of the chunk's classes, so that a small N still
// fills the GPU. Reductions use fixed trees and fixed merge orders: results are bit-reproducible.
#pragma once

#include <cstdint>

#include "row_math.cuh"

namespace arcface_kernels {

constexpr int kThreads = 256;

// Per-row inputs as device pointers: the margins are null in backward, lse, grad_rows and
// target_dcos in forward.
struct RowInputs {
  const int64_t* labels;  // -1 where the row has no target among these classes
  const float* rx;        // inverse norms (contract.RowNorms)
  const float* m1;
  const float* m2;
  const float* m3;
  const float* lse;
  const float* grad_rows;    // 0 on ignored rows
  const float* target_dcos;  // d loss / d cos of the target entry (op.target_cosine_gradient * grad)
};

__device__ __forceinline__ RowTerms load_row(const RowInputs& in, int64_t row) {
  return RowTerms{in.m1 ? in.m1[row] : 0.f,   in.m2 ? in.m2[row] : 0.f,
                  in.m3 ? in.m3[row] : 0.f,   in.lse ? in.lse[row] : 0.f,
                  in.grad_rows ? in.grad_rows[row] : 0.f, in.target_dcos ? in.target_dcos[row] : 0.f};
}

// The non-target epilogue's inputs (docs/design.md section 3c), device pointers: the rows'
// thresholds tau (N,) and the map's (a, b, e) (3,), read on the device (a running t is never read
// back to the host). Only the kernels' kNegatives specializations read them.
struct NegativeInputs {
  const float* threshold;
  const float* coeffs;
};

__device__ __forceinline__ RowNegatives load_negatives(const NegativeInputs& in, int64_t row) {
  return RowNegatives{in.threshold[row], in.coeffs[0], in.coeffs[1], in.coeffs[2]};
}

// The chunk-local target class of a row, or -1 when the chunk [first, first + count) lacks it.
__device__ __forceinline__ int64_t chunk_target(const RowInputs& in, int64_t row, int64_t first, int64_t count) {
  const int64_t label = in.labels[row];
  return (label >= first && label < first + count) ? label - first : -1;
}

// The chunk's classes [first, stop) this block's segment owns.
struct Segment {
  int64_t first, stop;
};

__device__ __forceinline__ Segment block_segment(int64_t chunk_classes) {
  const int64_t per_segment = (chunk_classes + gridDim.y - 1) / gridDim.y;
  const int64_t first = blockIdx.y * per_segment;
  return Segment{first, first + per_segment < chunk_classes ? first + per_segment : chunk_classes};
}

// Reduce one value per thread with `op` over a fixed halving tree (scratch: kThreads values).
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    __syncthreads();
  }
  const T result = scratch[0];
  __syncthreads();
  return result;
}

}  // namespace arcface_kernels
