// What GPU code this build of the extension carries, for the `cuda` backend's availability check
// (arcface_kernels/backends/cuda.py). nvcc lists the architectures it compiles for in
// __CUDA_ARCH_LIST__ (e.g. 750,800,900); setup.py names the one it also embeds as PTX.
#include <vector>

#include "build_info.h"

namespace arcface_kernels {

std::vector<int64_t> sass_architectures() {
#ifdef __CUDA_ARCH_LIST__
  std::vector<int64_t> archs{__CUDA_ARCH_LIST__};
  for (auto& arch : archs) arch /= 10;
  return archs;
#else
  return {};
#endif
}

int64_t ptx_architecture() {
#ifdef ARCFACE_KERNELS_PTX_ARCH
  return ARCFACE_KERNELS_PTX_ARCH;
#else
  return 0;
#endif
}

}  // namespace arcface_kernels
