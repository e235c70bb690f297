// The CUDA backend compiled as host C++ (DBN_EMULATION): the host files and the .cu kernels,
// unchanged, with kernel launches run on the host by cuda_emu.h. Registers kernels for the
// dbn::emu_* ops (schemas: dbn_kernels/ops.py) for CPU tensors, plus the test hooks of hooks.h.
// Built on demand by tests/emulation.py (torch.utils.cpp_extension.load, host compiler), as one
// translation unit.
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

#include "../checks.cpp"
#include "../planning.cpp"
#include "../ops_forward.cpp"
#include "../ops_backward.cpp"
#include "../binding.cpp"
#include "../collect_stats.cu"
#include "../backward_reduce.cu"
#include "../finalize.cu"
#include "../elementwise.cu"

#include "hooks.h"
