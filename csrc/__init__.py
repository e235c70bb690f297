"""CUDA sources of the extension dbn_kernels._C, shipped as package data so that an install
without the compiled extension can build it on first use (see dbn_kernels/_extension.py)."""
