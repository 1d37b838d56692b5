"""Tensors on the wire: float32, or bfloat16 carried as its 16-bit patterns.

Flower's arrays are NumPy arrays, and NumPy has no bfloat16. A bfloat16 tensor is
therefore sent as the ``uint16`` array of its bit patterns. Trainable states hold only
floating-point tensors, so on receipt a ``uint16`` array always means bfloat16.
"""

from collections.abc import Mapping, Sequence

from typing import TYPE_CHECKING, Any

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


# ---------------------------------------------------------------- packed records
# Flower stores and sends every array of a record as its own object: a message with 75
# arrays costs 75 requests each way between a SuperNode and the SuperLink (through the
# TLS proxy), which took most of a deployed round. A deployed run therefore carries a
# message's arrays packed into one: an 8-byte little-endian header length, a JSON list of
# {name, dtype, shape, stype, nbytes}, then every array's serialized bytes in that order.
PACKED = "fedra.packed"  # the one array name of a packed record
PACKED_STYPE = "fedra.packed/1"  # its stype: the format's version
MAX_PACKED_HEADER = 8 << 20  # bytes; a header beyond this is not one this project wrote
PackedItem = tuple[str, str, tuple[int, ...], str, bytes]  # name, dtype, shape, stype, bytes


def pack(items: Sequence[PackedItem]) -> bytes:
    """One blob holding every item (name, dtype, shape, stype, serialized bytes), in order."""
    import json
    import struct

    header = json.dumps([{"name": name, "dtype": dtype, "shape": list(shape), "stype": stype, "nbytes": len(data)}
                         for name, dtype, shape, stype, data in items]).encode()
    return b"".join([struct.pack("<Q", len(header)), header, *(data for *_, data in items)])


def is_packed(record: Mapping[str, Any]) -> bool:
    """Whether a record of arrays (name -> object with ``stype``) holds one packed array and nothing else."""
    return list(record.keys()) == [PACKED] and getattr(record[PACKED], "stype", None) == PACKED_STYPE


def unpack_numpy(blob: bytes) -> list[PackedItem]:
    """``unpack``, every entry also required to be a NumPy array (no other serialization is ever read)."""
    items = unpack(blob)
    strange = [name for name, _, _, stype, _ in items if stype != "numpy.ndarray"]
    if strange:
        raise WireError(f"packed arrays: {strange[0]} is not a NumPy array")
    return items


def unpack(blob: bytes) -> list[PackedItem]:
    """The items of a packed blob, every field checked; ``WireError`` naming what is wrong."""
    import json
    import struct

    if len(blob) < 8:
        raise WireError(f"packed arrays: {len(blob)} bytes, too short for the header length")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > min(MAX_PACKED_HEADER, len(blob) - 8):
        raise WireError(f"packed arrays: header of {size} bytes in a blob of {len(blob)} "
                        f"(at most {MAX_PACKED_HEADER})")
    try:
        header = json.loads(blob[8:8 + size])
    except (ValueError, UnicodeDecodeError) as err:
        raise WireError(f"packed arrays: the header is not JSON ({err})") from err
    if not isinstance(header, list):
        raise WireError("packed arrays: the header is not a list of arrays")
    items, offset, names = [], 8 + size, set()
    for i, entry in enumerate(header):
        fields = ("name", "dtype", "shape", "stype", "nbytes")
        if not isinstance(entry, dict) or set(entry) != set(fields):
            raise WireError(f"packed arrays: entry {i} does not have exactly the fields {list(fields)}")
        name, dtype, shape, stype, nbytes = (entry[f] for f in fields)
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(stype, str):
            raise WireError(f"packed arrays: entry {i}: name, dtype and stype must be strings")
        if name in names:
            raise WireError(f"packed arrays: {name!r} appears twice")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WireError(f"packed arrays: {name}: shape {shape!r} is not a list of sizes")
        if type(nbytes) is not int or nbytes < 0 or offset + nbytes > len(blob):
            raise WireError(f"packed arrays: {name}: {nbytes!r} bytes at offset {offset} overrun the "
                            f"{len(blob)}-byte blob")
        names.add(name)
        items.append((name, dtype, tuple(shape), stype, blob[offset:offset + nbytes]))
        offset += nbytes
    if offset != len(blob):
        raise WireError(f"packed arrays: {len(blob) - offset} bytes after the last array")
    return items
