// The GPU code this build of the extension carries (build_info.cu), as 10 * major + minor.
#pragma once

#include <cstdint>
#include <vector>

namespace arcface_kernels {

std::vector<int64_t> sass_architectures();  // every architecture nvcc compiled SASS for
int64_t ptx_architecture();                 // the one also embedded as PTX for newer GPUs to JIT; 0 if none

}  // namespace arcface_kernels
