"""``dbn-bench``: the project's kernels against cuDNN, PyTorch's native batch norm and torch.compile.

One file per concept:

* ``shapes``      the suites (which tensors), the modes and the byte model;
* ``cases``       random inputs of one case and their float64 expected outputs;
* ``providers``   every implementation that can be timed, with its availability;
* ``timing``      CUDA-event (or, on CPU, interleaved perf_counter_ns) medians, noise flag;
* ``runner``      check every provider against the oracle, then time it: one row per result;
* ``environment`` what the numbers were measured on;
* ``report``      terminal table, progress bar, JSON, CSV and PNG;
* ``resnet``/``e2e`` the ResNet-50 training-step benchmark (``--model resnet50``);
* ``cli``         the command line;
* ``host_overhead`` per-call host time of the layers against ``nn.BatchNorm2d`` (tiny inputs);
* ``sync``        the sync layers against the local ones over N ranks (``--sync-world N``);
* ``gpu_check_plan`` the stages of ``bench/gpu_check.sh``: case counts and a GPU-time estimate;
* ``summary``     SUMMARY.md of a ``bench/gpu_check.sh`` run, against the project's goals.

The source lives in ``bench/`` and installs as ``dbn_kernels.benchmark`` (setup.py's
``package_dir``); ``bench/suite/`` (the pytest-benchmark suite) and ``bench/results/`` are not part
of the package. Nothing here is imported by ``import dbn_kernels``: the benchmark is opt-in.
"""
