"""Build script. Pure-Python package everywhere; the CUDA extension ``dbn_kernels._C`` is added
when the build can see a CUDA-enabled torch and nvcc (see ``csrc/`` and README)."""

from setuptools import setup

PACKAGES = ["dbn_kernels", "dbn_kernels.triton_kernels"]
# The Triton kernels live in top-level triton_kernels/ but install as dbn_kernels.triton_kernels:
# the bare name belongs to another PyPI package.
PACKAGE_DIR = {"dbn_kernels": "dbn_kernels", "dbn_kernels.triton_kernels": "triton_kernels"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
