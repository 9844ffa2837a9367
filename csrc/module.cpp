// The importable Python module arcface_kernels._C; importing it runs the TORCH_LIBRARY
// registrations in margin_softmax.cu (torch.ops.arcface_kernels_cuda.*).
#include <Python.h>

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "arcface_kernels CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
