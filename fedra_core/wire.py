"""Tensors on the wire: float32, or bfloat16 carried as its 16-bit patterns.

Flower's arrays are NumPy arrays, and NumPy has no bfloat16. A bfloat16 tensor is
therefore sent as the ``uint16`` array of its bit patterns. Trainable states hold only
floating-point tensors, so on receipt a ``uint16`` array always means bfloat16.
"""

from collections.abc import Mapping

import numpy as np
import torch

WIRE_DTYPES = ("float32", "bfloat16")


def encode(state: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """NumPy arrays to send for ``state``, in ``wire_dtype``."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r} is not one of {WIRE_DTYPES}")
    out = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if wire_dtype == "bfloat16":
            out[key] = value.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()
        else:
            out[key] = value.to(torch.float32).contiguous().numpy()
    return out


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Float32 tensors from received arrays (``uint16`` arrays are bfloat16 bit patterns)."""
    out = {}
    for key, array in arrays.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.dtype == torch.uint16:
            tensor = tensor.view(torch.bfloat16)
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out
