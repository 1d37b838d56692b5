"""Packed records: a deployed message's arrays travel as one array, read back exactly, checked as untrusted.

The deployed runs in tests/test_deployment.py, test_launchers.py and test_worker.py go
through the packed path end to end (the ServerApp's grid packs every task); these tests
pin the format and its refusals.
"""

import json
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client_app.app import _raw, _reply_record
from fedra_core.aggregation import InvalidReply
from fedra_core.config import TaskRefused
from fedra_core.wire import PACKED, PACKED_STYPE, WireError, encode, is_packed, pack, unpack
from server_app.grid import PromptGrid, packed_record
from server_app.replies import read_arrays

from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture

STATE = {"blocks.0.attn.proj.lora_A": torch.randn(8, 64), "blocks.0.attn.proj.lora_B": torch.randn(64, 8),
         "head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}


def _record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in encode(state).items()})


def _blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def _blob(header: object, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


def test_a_packed_task_reads_as_the_unpacked_one() -> None:
    record = _record(STATE)
    packed = packed_record(record)
    assert list(packed.keys()) == [PACKED] and is_packed(packed) and not is_packed(record)
    assert _raw(packed) == _raw(record)
    assert packed_record(packed) is packed  # never packed twice


def test_a_packed_reply_reads_back_exactly() -> None:
    delta = {k: (v * 0.01).numpy() for k, v in STATE.items()}
    for packed in (True, False):
        back = read_arrays(_reply_record(delta, packed), STATE, "float32")
        assert all(torch.equal(back[k], torch.from_numpy(delta[k])) for k in delta)


def test_packing_takes_one_object_instead_of_one_per_array() -> None:
    record = _record(STATE)
    assert len(record.children) == len(STATE)
    assert len(packed_record(record).children) == 1


class PushedGrid(StaticGrid):
    """A grid that takes pushed messages (and keeps them)."""

    def push_messages(self, messages):  # type: ignore[override]
        self.pushed = list(messages)
        return [str(i) for i, _ in enumerate(self.pushed)]


def test_the_grid_packs_every_tasks_arrays_in_place() -> None:
    inner = PushedGrid([1])
    grid = PromptGrid(inner)
    message = Message(RecordDict({"arrays": _record(STATE), "config": ConfigRecord({})}), dst_node_id=1,
                      message_type="train")
    grid.push_messages([message])
    assert inner.pushed == [message] and list(message.content["arrays"].keys()) == [PACKED]
    assert _raw(message.content["arrays"]) == _raw(_record(STATE))


@pytest.mark.parametrize("blob, reason", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 10 ** 9) + b"[]", "header of 1000000000 bytes"),
    (struct.pack("<Q", 3) + b"{{{", "not JSON"),
    (_blob({"name": "a"}), "not a list"),
    (_blob([{"name": "a", "dtype": "float32", "shape": [2]}]), "exactly the fields"),
    (_blob([{"name": 1, "dtype": "float32", "shape": [2], "stype": "numpy.ndarray", "nbytes": 0}]),
     "must be strings"),
    (_blob([{"name": "a", "dtype": "float32", "shape": [-2], "stype": "numpy.ndarray", "nbytes": 0}]),
     "not a list of sizes"),
    (_blob([{"name": "a", "dtype": "float32", "shape": [2], "stype": "numpy.ndarray", "nbytes": 99}], b"x"),
     "overrun"),
    (_blob([{"name": "a", "dtype": "float32", "shape": [2], "stype": "numpy.ndarray", "nbytes": 1}] * 2, b"xy"),
     "appears twice"),
    (_blob([{"name": "a", "dtype": "float32", "shape": [2], "stype": "numpy.ndarray", "nbytes": 1}], b"xyz"),
     "after the last array"),
])
def test_a_bad_pack_is_refused_by_name(blob: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        unpack(blob)
    with pytest.raises(TaskRefused, match=reason):  # a node receiving it as a task
        _raw(_blob_record(blob))
    with pytest.raises(InvalidReply, match=reason):  # the server receiving it as a reply
        read_arrays(_blob_record(blob), {"a": torch.zeros(2)}, "float32")


def test_packed_arrays_get_the_same_checks_as_unpacked_ones() -> None:
    good = np.zeros(2, dtype=np.float32)
    wrong_shape = Array(np.zeros(3, dtype=np.float32))
    blob = pack([("a", wrong_shape.dtype, tuple(wrong_shape.shape), wrong_shape.stype, wrong_shape.data)])
    with pytest.raises(InvalidReply, match=r"a: shape \(3,\), expected \(2,\)"):
        read_arrays(_blob_record(blob), {"a": torch.from_numpy(good)}, "float32")
    pickled = pack([("a", "float32", (2,), "pickle", b"\x80\x04")])
    with pytest.raises(InvalidReply, match="not a NumPy array"):
        read_arrays(_blob_record(pickled), {"a": torch.from_numpy(good)}, "float32")
    with pytest.raises(TaskRefused, match="not a NumPy array"):
        _raw(_blob_record(pickled))
