"""Tensors on the wire: float32, or bfloat16 carried as its 16-bit patterns.

Flower's arrays are NumPy arrays, and NumPy has no bfloat16. A bfloat16 tensor is
therefore sent as the ``uint16`` array of its bit patterns. Trainable states hold only
floating-point tensors, so on receipt a ``uint16`` array always means bfloat16.
"""

from collections.abc import Mapping, Sequence

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

WIRE_DTYPES = ("float32", "bfloat16")


def encode(state: Mapping[str, "torch.Tensor"], wire_dtype: str = "float32") -> dict[str, np.ndarray]:
    """NumPy arrays to send for ``state``, in ``wire_dtype``."""
    import torch  # here, not at import: a ClientApp whose warm worker trains never loads torch

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


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, "torch.Tensor"]:
    """Float32 tensors from received arrays (``uint16`` arrays are bfloat16 bit patterns)."""
    import torch

    out = {}
    for key, array in arrays.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.dtype == torch.uint16:
            tensor = tensor.view(torch.bfloat16)
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


# Bytes an ``.npy`` header may take beyond the data (the format pads it to 64 bytes;
# long shapes need more): anything larger is not the array its metadata describes.
NPY_HEADER_ALLOWANCE = 4096
WIRE_NUMPY_DTYPES = {"float32": "float32", "bfloat16": "uint16"}


class WireError(ValueError):
    """Received arrays do not have the names, shapes, dtypes or sizes expected."""


def check_array_meta(name: str, dtype: str, shape: Sequence[int], nbytes: int,
                     expected_shape: Sequence[int] | None, wire_dtype: str) -> None:
    """Check one received array's metadata before its bytes are decoded.

    Parameters
    ----------
    name : str
        The array's key, for the message.
    dtype, shape, nbytes : str, Sequence[int], int
        What the array declares, and the length of its serialized bytes.
    expected_shape : Sequence[int] or None
        The shape the receiver expects; ``None`` accepts any shape (still bounded by
        ``nbytes``).
    wire_dtype : str
        The wire dtype agreed for the message (``float32`` or ``bfloat16``).

    Raises
    ------
    WireError
        Naming the array and what is wrong.
    """
    want = WIRE_NUMPY_DTYPES.get(wire_dtype)
    if want is None:
        raise WireError(f"wire dtype {wire_dtype!r} is not one of {WIRE_DTYPES}")
    if dtype != want:
        raise WireError(f"{name}: dtype {dtype!r}, expected {want!r} for the {wire_dtype} wire")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"{name}: shape {tuple(shape)!r} is not a tuple of sizes")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise WireError(f"{name}: shape {tuple(shape)}, expected {tuple(expected_shape)}")
    data_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(want).itemsize
    if not data_bytes <= nbytes <= data_bytes + NPY_HEADER_ALLOWANCE:
        raise WireError(f"{name}: {nbytes} serialized bytes for a {tuple(shape)} {dtype} array")


def check_decoded(name: str, array: np.ndarray, dtype: str, shape: Sequence[int]) -> None:
    """The decoded array is what its metadata declared (the ``.npy`` header can say otherwise)."""
    if str(array.dtype) != dtype or tuple(array.shape) != tuple(shape):
        raise WireError(f"{name}: decoded as {array.dtype} {tuple(array.shape)}, "
                        f"declared {dtype} {tuple(shape)}")
