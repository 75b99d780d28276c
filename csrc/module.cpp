// Python module `kdc_kernels._C`. Loading the library registers the CUDA kernels of every op with
// the torch dispatcher (the TORCH_LIBRARY_IMPL blocks of the bindings); the module itself is empty.
#include <Python.h>

static struct PyModuleDef kdc_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "CUDA kernels of kdc_kernels, registered as torch.ops.kdc.cuda_* implementations.", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kdc_c_module); }
