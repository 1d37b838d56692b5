"""The FedRA Strategy on real Flower messages: allocation per node, reply checks."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedra_core.config import experiment_from_dict
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import FedRA, NodeInfo

NUM_LAYERS = 4


def _global_state() -> dict[str, torch.Tensor]:
    state = {f"blocks.{i}.attn.proj.lora_A.weight": torch.randn(2, 3) for i in range(NUM_LAYERS)}
    state["head.weight"] = torch.randn(5, 3)
    return state


def _strategy(capacities: list[int], method: str = "fedra") -> tuple[FedRA, StaticGrid]:
    experiment = experiment_from_dict({"clients": {"capacities": capacities}, "strategy": {"method": method}})
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    ids = [100 + i for i in range(len(capacities))]
    strategy.nodes = {n: NodeInfo(n, i, capacities[i], f"d{i}", 10) for i, n in enumerate(ids)}
    return strategy, StaticGrid(ids)


def _reply(sent: Message, delta: dict[str, torch.Tensor], examples: int = 10) -> Message:
    content = RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord({"num-examples": examples})})
    return Message(content, reply_to=sent)


def test_each_node_gets_its_blocks_and_the_shared_parts() -> None:
    strategy, grid = _strategy([4, 2, 1])
    messages = list(strategy.configure_train(1, ArrayRecord(_global_state()), ConfigRecord(), grid))
    for message, capacity in zip(messages, [4, 2, 1]):
        layers = list(message.content["config"]["layers"])
        keys = set(message.content["arrays"].keys())
        assert len(layers) == capacity and layers == sorted(layers)
        assert keys == {f"blocks.{i}.attn.proj.lora_A.weight" for i in layers} | {"head.weight"}


def test_first_method_sends_the_first_blocks() -> None:
    strategy, grid = _strategy([3, 1], method="first")
    messages = list(strategy.configure_train(1, ArrayRecord(_global_state()), ConfigRecord(), grid))
    assert [list(m.content["config"]["layers"]) for m in messages] == [[0, 1, 2], [0]]


@pytest.mark.parametrize("corrupt", ["missing-key", "nan", "shape", "no-examples", "extra-key"])
def test_malformed_reply_is_rejected_and_leaves_no_trace(corrupt: str) -> None:
    strategy, grid = _strategy([4, 4])
    state = _global_state()
    good, bad = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    sent_bad = bad.content["arrays"].to_torch_state_dict()
    delta_bad = {k: torch.ones_like(v) for k, v in sent_bad.items()}
    examples = 10
    if corrupt == "missing-key":
        delta_bad.pop("head.weight")
    elif corrupt == "nan":
        delta_bad["head.weight"] = torch.full((5, 3), float("nan"))
    elif corrupt == "shape":
        delta_bad["head.weight"] = torch.ones(2, 2)
    elif corrupt == "no-examples":
        examples = 0
    else:
        delta_bad["blocks.9.attn.proj.lora_A.weight"] = torch.ones(2, 3)
    delta_good = {k: torch.full_like(v, 0.5) for k, v in good.content["arrays"].to_torch_state_dict().items()}

    arrays, metrics = strategy.aggregate_train(1, [_reply(good, delta_good), _reply(bad, delta_bad, examples)])

    new_state = arrays.to_torch_state_dict()
    for key, value in state.items():
        torch.testing.assert_close(new_state[key], value + 0.5)  # only the good client's delta
    statuses = {c["node_id"]: c["status"] for c in strategy.last_record["clients"]}
    assert statuses == {100: "ok", 101: "rejected"}
    assert strategy.last_record["failures"][0]["reason"]
    assert metrics["clients-ok"] == 1


def test_error_and_missing_replies_keep_the_round_going() -> None:
    strategy, grid = _strategy([2, 2, 2])
    state = _global_state()
    first, second, _third = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    error = Message(Error(code=0, reason="ClientApp crashed"), reply_to=second)
    delta = {k: torch.ones_like(v) for k, v in first.content["arrays"].to_torch_state_dict().items()}

    arrays, _ = strategy.aggregate_train(1, [_reply(first, delta), error])

    new_state = arrays.to_torch_state_dict()
    held = set(first.content["arrays"].keys())
    for key, value in state.items():
        torch.testing.assert_close(new_state[key], value + 1 if key in held else value)
    reasons = {f["node_id"]: f["reason"] for f in strategy.last_record["failures"]}
    assert reasons[101] == "ClientApp crashed" and "no reply" in reasons[102]


def test_no_valid_reply_leaves_the_state_unchanged() -> None:
    strategy, grid = _strategy([2])
    state = _global_state()
    (message,) = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    arrays, metrics = strategy.aggregate_train(1, [])
    assert metrics is None
    assert all(torch.equal(arrays.to_torch_state_dict()[k], v) for k, v in state.items())


def test_too_few_clients_stops_with_a_clear_message() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2]}, "strategy": {"min_clients": 3}})
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    strategy.nodes = {1: NodeInfo(1, 0, 2, "a", 5), 2: NodeInfo(2, 1, 2, "b", 5)}
    with pytest.raises(RuntimeError, match="min_clients"):
        list(strategy.configure_train(1, ArrayRecord(_global_state()), ConfigRecord(), StaticGrid([1, 2])))


def test_bfloat16_wire_halves_the_bytes_and_aggregates() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [4]}, "strategy": {"wire_dtype": "bfloat16"}})
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    strategy.nodes = {100: NodeInfo(100, 0, 4, "d0", 10)}
    state = {k: torch.randn(64, 256) for k in _global_state()}  # large enough that headers are noise
    (message,) = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), StaticGrid([100]))
    arrays = message.content["arrays"]
    assert all(a.numpy().dtype == np.uint16 for a in arrays.values())
    assert message.content["config"]["wire-dtype"] == "bfloat16"
    raw = sum(v.numel() * 4 for v in state.values())
    assert strategy.pending.bytes_sent[100] < 0.6 * raw

    from fedra_core.wire import encode

    delta = encode({k: torch.full_like(v, 0.25) for k, v in state.items()}, "bfloat16")
    reply = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in delta.items()}),
                                "metrics": MetricRecord({"num-examples": 3})}), reply_to=message)
    new_state, _ = strategy.aggregate_train(1, [reply])
    for key, value in state.items():
        torch.testing.assert_close(new_state.to_torch_state_dict()[key], value + 0.25)
