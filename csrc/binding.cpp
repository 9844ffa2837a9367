// The importable Python module arcface_kernels._C: importing it registers the ops of ops.h with
// the torch dispatcher as torch.ops.arcface_kernels_cuda.* (CUDA implementations).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace arcface_kernels {

TORCH_LIBRARY(arcface_kernels_cuda, m) {
  m.def("partial_stats(Tensor x, Tensor w, Tensor labels, Tensor m1, Tensor m2, Tensor m3, float scale, "
        "int sub_centers, bool easy_margin) -> Tensor[]");
  m.def("backward(Tensor grad_rows, Tensor x, Tensor w, Tensor labels, Tensor m1, Tensor m2, Tensor m3, "
        "Tensor lse, float scale, int sub_centers, bool easy_margin, bool straight_through, "
        "float label_smoothing, int num_classes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(arcface_kernels_cuda, CUDA, m) {
  m.impl("partial_stats", &partial_stats);
  m.impl("backward", &backward);
}

}  // namespace arcface_kernels

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "arcface_kernels CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
