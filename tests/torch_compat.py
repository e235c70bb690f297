"""PyTorch's own batch-norm modules on every supported torch, for comparing against.

``nn.BatchNorm*d(..., bias=False)`` exists from torch 2.12 on; on 2.11 the same module (weight,
no bias parameter, bias-free state_dict) is built by removing the bias after construction, which
is what the newer constructor does internally too.
"""

import inspect

from torch import nn

TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(
    nn.modules.batchnorm._NormBase.__init__).parameters


def torch_norm(torch_cls, num_features, *args, bias=True, **kwargs):
    """``torch_cls(num_features, *args, bias=bias, **kwargs)`` on any supported torch."""
    if TORCH_HAS_BIAS_KWARG:
        return torch_cls(num_features, *args, bias=bias, **kwargs)
    module = torch_cls(num_features, *args, **kwargs)
    if not bias and module.bias is not None:
        module.register_parameter("bias", None)
    return module
