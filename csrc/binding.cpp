// Registration of the cuda backend's kernels (dbn::cuda_*; dbn::emu_* for CPU tensors in the
// emulation) for the ops that dbn_kernels/ops.py defines: implementations only, no schemas. A
// kernel whose C++ signature (ops.h) does not match its Python schema fails here, at import,
// which dbn_kernels/_extension.py reports as a stale build.
#ifndef DBN_EMULATION
#include <Python.h>
#endif

#include <torch/library.h>

#include "ops.h"

#ifdef DBN_EMULATION
#define DBN_DISPATCH_KEY CPU
#else
#define DBN_DISPATCH_KEY CUDA
#endif

TORCH_LIBRARY_IMPL(dbn, DBN_DISPATCH_KEY, m) {
  m.impl(DBN_OP_PREFIX "batch_stats", &dbn::batch_stats);
  m.impl(DBN_OP_PREFIX "finalize", &dbn::finalize);
  m.impl(DBN_OP_PREFIX "normalize", &dbn::normalize);
  m.impl(DBN_OP_PREFIX "backward_reduce", &dbn::backward_reduce);
  m.impl(DBN_OP_PREFIX "backward_finalize", &dbn::backward_finalize);
  m.impl(DBN_OP_PREFIX "backward_dx", &dbn::backward_dx);
  m.impl(DBN_OP_PREFIX "train_forward", &dbn::train_forward);
  m.impl(DBN_OP_PREFIX "eval_forward", &dbn::eval_forward);
  m.impl(DBN_OP_PREFIX "backward", &dbn::backward);
}

#ifndef DBN_EMULATION
// `import dbn_kernels._C` needs a module init function; the kernels above register on load.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
