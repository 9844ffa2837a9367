// GEMMs of bfloat16 operands with float32 accumulation and output on the CPU, for the `torch`
// backend's class walk on bfloat16 inputs (backends/chunked.py, docs/backends/torch.md "bfloat16
// operands"). torch 2.14's CPU matmul of two bfloat16 matrices returns bfloat16 (its output rounded:
// a cosine to 8 bits) and has no float32-output form on the CPU; upcasting the operands instead costs
// a float32 copy of every class chunk. oneMKL, which torch's x86 builds carry inside libtorch_cpu,
// exports cblas_gemm_bf16bf16f32: bfloat16 operands, float32 accumulation and output (AVX512-BF16 /
// AMX where the CPU has them, converted on the way elsewhere). It is looked up at run time, so that a
// torch without it (another BLAS, another platform) builds and runs this file too: has_bf16_gemm then
// says false and the walk upcasts.
//
// Registers torch.ops.arcface_kernels_cpu.bf16_gemm and has_bf16_gemm (the library is defined in
// cpu_epilogue.cpp).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <climits>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace arcface_kernels {
namespace {

// oneMKL's CBLAS (LP64: MKL_INT is int; MKL_BF16 is the 16-bit pattern c10::BFloat16 holds).
using CblasBf16Gemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                               int lda, const void* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

CblasBf16Gemm find_gemm() {
#if defined(__linux__) || defined(__APPLE__)
  // the torch library this extension links against, already loaded (RTLD_NOLOAD), whatever its path
  for (const char* library : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    if (void* handle = dlopen(library, RTLD_LAZY | RTLD_NOLOAD)) {
      void* symbol = dlsym(handle, "cblas_gemm_bf16bf16f32");
      dlclose(handle);  // drops the reference RTLD_NOLOAD took; torch keeps the library loaded
      if (symbol) return reinterpret_cast<CblasBf16Gemm>(symbol);
    }
  }
#endif
  return nullptr;
}

CblasBf16Gemm gemm() {
  static const CblasBf16Gemm found = find_gemm();
  return found;
}

// (transpose flag, leading dimension) of a 2-d operand in row-major CBLAS terms: rows contiguous
// (stride(1) == 1) as it is, columns contiguous as the transpose of a row-major matrix.
std::pair<int, int64_t> layout(const at::Tensor& m, const char* name) {
  if (m.stride(1) == 1 && m.stride(0) >= std::max<int64_t>(m.size(1), 1)) return {kNoTrans, m.stride(0)};
  if (m.stride(0) == 1 && m.stride(1) >= std::max<int64_t>(m.size(0), 1)) return {kTrans, m.stride(1)};
  TORCH_CHECK(false, "bf16_gemm: ", name, " must have contiguous rows or contiguous columns");
}

}  // namespace

// Is there a float32-output GEMM for bfloat16 operands here?
bool has_bf16_gemm() { return gemm() != nullptr; }

// out = a @ b + beta out, with a (M x K) and b (K x N) bfloat16, each with contiguous rows or
// columns, accumulated and written in float32 into out (M x N, contiguous rows).
void bf16_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(), "bf16_gemm: CPU tensors");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "bf16_gemm: out (M x N) = a (M x K) @ b (K x N)");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "bf16_gemm: bfloat16 a and b");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.stride(1) == 1 && out.stride(0) >= out.size(1),
              "bf16_gemm: out is float32 with contiguous rows");
  TORCH_CHECK(has_bf16_gemm(), "bf16_gemm: this torch has no float32-output bfloat16 GEMM (has_bf16_gemm)");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: beta out, and 0 (not 0 times what out held) for beta = 0
    beta == 0.0 ? out.zero_() : out.mul_(beta);
    return;
  }
  const auto [trans_a, lda] = layout(a, "a");
  const auto [trans_b, ldb] = layout(b, "b");
  for (int64_t v : {m, n, k, lda, ldb, out.stride(0)}) {
    TORCH_CHECK(v <= INT_MAX, "bf16_gemm: sizes and strides must fit a 32-bit int");
  }
  gemm()(kRowMajor, trans_a, trans_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.f,
         a.data_ptr(), static_cast<int>(lda), b.data_ptr(), static_cast<int>(ldb), static_cast<float>(beta),
         out.data_ptr<float>(), static_cast<int>(out.stride(0)));
}

TORCH_LIBRARY_FRAGMENT(arcface_kernels_cpu, m) {
  m.def("bf16_gemm(Tensor(a!) out, Tensor a, Tensor b, float beta=0.0) -> ()");
  m.def("has_bf16_gemm() -> bool", &has_bf16_gemm);
}

TORCH_LIBRARY_IMPL(arcface_kernels_cpu, CPU, m) { m.impl("bf16_gemm", &bf16_gemm); }

}  // namespace arcface_kernels
