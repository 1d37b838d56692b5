"""Masked averaging against a direct computation; reply checks."""

import pytest
import torch

from fedra_core.aggregation import InvalidReply, check_delta, masked_average


def _random_setup(seed: int) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    keys = [f"blocks.{i}.attn.proj.lora_A.weight" for i in range(5)] + ["head.weight"]
    global_state = {k: torch.randn(4, 3, generator=gen) for k in keys}
    holders = [keys[:3] + ["head.weight"], keys[2:], ["head.weight", keys[0]]]
    deltas = [{k: torch.randn(4, 3, generator=gen) for k in held} for held in holders]
    return global_state, deltas


def _direct(global_state: dict, deltas: list[dict], weights: list[float]) -> dict:
    out = {}
    for key, value in global_state.items():
        pairs = [(d[key], w) for d, w in zip(deltas, weights) if key in d]
        total = sum(w for _, w in pairs)
        out[key] = value + sum(d * w for d, w in pairs) / total if pairs else value
    return out


@pytest.mark.parametrize("weights", [None, [1.0, 5.0, 2.0]])
def test_matches_direct_computation(weights: list[float] | None) -> None:
    global_state, deltas = _random_setup(0)
    result = masked_average(global_state, deltas, weights)
    expected = _direct(global_state, deltas, weights or [1.0] * len(deltas))
    for key in global_state:
        torch.testing.assert_close(result[key], expected[key])


def test_key_in_no_delta_keeps_its_value() -> None:
    global_state, deltas = _random_setup(1)
    global_state["blocks.9.mlp.fc2.lora_B.weight"] = torch.ones(2)
    result = masked_average(global_state, deltas)
    assert torch.equal(result["blocks.9.mlp.fc2.lora_B.weight"], torch.ones(2))


def test_block_held_by_one_client_is_not_shrunk() -> None:
    global_state = {"a": torch.zeros(3), "b": torch.zeros(3)}
    deltas = [{"a": torch.ones(3), "b": torch.ones(3)}, {"a": torch.ones(3) * 3}]
    result = masked_average(global_state, deltas)
    assert torch.equal(result["b"], torch.ones(3))  # one holder: its full delta
    assert torch.equal(result["a"], torch.full((3,), 2.0))


def test_inputs_are_not_modified() -> None:
    global_state, deltas = _random_setup(2)
    before = ({k: v.clone() for k, v in global_state.items()}, [{k: v.clone() for k, v in d.items()} for d in deltas])
    masked_average(global_state, deltas, [1.0, 2.0, 3.0])
    assert all(torch.equal(global_state[k], before[0][k]) for k in global_state)
    assert all(torch.equal(d[k], b[k]) for d, b in zip(deltas, before[1]) for k in d)


def test_bad_weights_and_keys() -> None:
    global_state, deltas = _random_setup(3)
    with pytest.raises(ValueError, match="weights"):
        masked_average(global_state, deltas, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        masked_average(global_state, deltas, [1.0, -1.0, 1.0])
    with pytest.raises(KeyError, match="not in the global state"):
        masked_average(global_state, [{"nope": torch.zeros(1)}])


def test_check_delta_rejects_bad_replies() -> None:
    sent = {"a": torch.zeros(2, 2), "b": torch.zeros(3)}
    check_delta({"a": torch.ones(2, 2), "b": torch.ones(3)}, sent)
    with pytest.raises(InvalidReply, match="missing"):
        check_delta({"a": torch.ones(2, 2)}, sent)
    with pytest.raises(InvalidReply, match="unexpected"):
        check_delta({"a": torch.ones(2, 2), "b": torch.ones(3), "c": torch.ones(1)}, sent)
    with pytest.raises(InvalidReply, match="shape"):
        check_delta({"a": torch.ones(2, 3), "b": torch.ones(3)}, sent)
    with pytest.raises(InvalidReply, match="NaN"):
        check_delta({"a": torch.full((2, 2), float("nan")), "b": torch.ones(3)}, sent)
    with pytest.raises(InvalidReply, match="floating"):
        check_delta({"a": torch.ones(2, 2, dtype=torch.int64), "b": torch.ones(3)}, sent)
