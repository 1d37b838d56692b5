"""Tensors on the wire: float32 exact, bfloat16 half the bytes and close."""

import numpy as np
import pytest
import torch

from fedra_core.wire import decode, encode


def test_float32_round_trip_is_exact() -> None:
    state = {"a": torch.randn(4, 5), "b": torch.randn(3)}
    back = decode(encode(state))
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_bfloat16_halves_the_bytes_and_stays_close() -> None:
    state = {"a": torch.randn(64, 32)}
    wire = encode(state, "bfloat16")
    assert wire["a"].dtype == np.uint16 and wire["a"].nbytes == state["a"].nbytes // 2
    back = decode(wire)
    assert back["a"].dtype == torch.float32
    torch.testing.assert_close(back["a"], state["a"], rtol=1e-2, atol=1e-2)
    assert torch.equal(back["a"], state["a"].to(torch.bfloat16).float())


def test_unknown_wire_dtype() -> None:
    with pytest.raises(ValueError, match="float16"):
        encode({"a": torch.zeros(1)}, "float16")
