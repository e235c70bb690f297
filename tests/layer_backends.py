"""Backends for tests that run the layers (not the ops): the names their ``backend=`` takes."""

import pytest
import torch


def prepare_layer_backend(name: str, request) -> str:
    """Make backend ``name`` usable by the layers and the functional forms in this process (skip
    what cannot run here) and return the value for their ``backend=``. The emulation (``"emu"``)
    is no user-facing backend name, so it is put in backend resolution's cache, the one place
    that would refuse it."""
    import dbn_kernels as dbn

    if name == "triton":
        pytest.importorskip("triton")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if "triton" not in dbn.available_backends(device):
            pytest.skip(f"Triton cannot run on {device} here")
    elif name == "emu":
        request.getfixturevalue("emulation")
        dbn.backends._RESOLVED[("emu", None, "cpu")] = "emu"
    elif name == "cuda":
        from dbn_kernels import _extension

        reason = _extension.load()
        if reason is not None:
            pytest.fail(f"a GPU is present but the cuda backend is not: {reason}")
    return name
