// The CUDA backend compiled as host C++ (DBN_EMULATION): binding.cpp's host logic and the .cu
// kernels, unchanged, with kernel launches run on CPU threads by cuda_emu.h. Registers
// dbn::emu_train_forward / emu_eval_forward / emu_backward for CPU tensors, with the cuda ops'
// schemas. Built on demand by tests/test_cuda.py (torch.utils.cpp_extension.load, host compiler).
#ifndef DBN_EMULATION
#error "compile with -DDBN_EMULATION"
#endif

// Library headers first: cuda_emu.h defines names (threadIdx, __shared__, ...) as macros.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cuda_emu.h"

#include "../binding.cpp"
#include "../collect_stats.cu"
#include "../backward_reduce.cu"
#include "../finalize.cu"
#include "../elementwise.cu"
