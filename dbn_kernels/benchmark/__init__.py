"""``dbn-bench``: the project's kernels against cuDNN, PyTorch's native batch norm and torch.compile.

One file per concept:

* ``shapes``      the suites (which tensors), the modes and SPEC §5's byte model;
* ``oracle``      random inputs of one case and their float64 expected outputs;
* ``providers``   every implementation that can be timed, with its availability;
* ``timing``      CUDA-event (or, on CPU, perf_counter) medians with warm-up and L2 flushing;
* ``runner``      check every provider against the oracle, then time it: one row per result;
* ``environment`` what the numbers were measured on;
* ``report``      terminal table, progress bar, JSON, CSV and PNG;
* ``resnet``/``e2e`` the ResNet-50 training-step benchmark (``--model resnet50``);
* ``cli``         the command line.

Nothing here is imported by ``import dbn_kernels``: the benchmark is opt-in.
"""
