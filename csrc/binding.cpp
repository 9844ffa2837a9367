// The importable Python module arcface_kernels._C: importing it registers the ops of ops.h with
// the torch dispatcher as torch.ops.arcface_kernels_cuda.* (CUDA implementations), and the module
// records the GPU code it carries: SASS_ARCHS (tuple of 10 * major + minor) and PTX_ARCH (0 if none),
// and CLASS_ALIGN, the class multiple of its chunks (chunk_size.h).
#include <Python.h>
#include <torch/library.h>

#include "build_info.h"
#include "chunk_size.h"
#include "ops.h"

namespace arcface_kernels {

TORCH_LIBRARY(arcface_kernels_cuda, m) {
  m.def("partial_stats(Tensor x, Tensor w, Tensor labels, Tensor m1, Tensor m2, Tensor m3, Tensor rx, Tensor rw, "
        "float scale, int sub_centers, bool easy_margin, float? clip_eps, Tensor? threshold, Tensor? coeffs, "
        "int workspace_bytes) -> Tensor[]");
  m.def("grad_chunk(Tensor x, Tensor w_rows, Tensor labels, Tensor rx, Tensor rw_rows, Tensor lse, "
        "Tensor grad_rows, Tensor target_dcos, Tensor(a!) out, int first_class, float scale, int sub_centers, "
        "float smoothing_per_class, Tensor? threshold, Tensor? coeffs) -> ()");
  m.def("project_rows(Tensor grad, Tensor v, Tensor proj, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(arcface_kernels_cuda, CUDA, m) {
  m.impl("partial_stats", &partial_stats);
  m.impl("grad_chunk", &grad_chunk);
  m.impl("project_rows", &project_rows);
}

}  // namespace arcface_kernels

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "arcface_kernels CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const auto archs = arcface_kernels::sass_architectures();
  PyObject* sass = PyTuple_New(static_cast<Py_ssize_t>(archs.size()));
  for (size_t i = 0; sass != nullptr && i < archs.size(); ++i) {
    PyTuple_SET_ITEM(sass, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(archs[i]));
  }
  if (sass == nullptr || PyModule_AddObject(module, "SASS_ARCHS", sass) < 0) {  // steals sass on success
    Py_XDECREF(sass);
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "PTX_ARCH", static_cast<long>(arcface_kernels::ptx_architecture())) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "CLASS_ALIGN", static_cast<long>(arcface_kernels::kClassAlign)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
