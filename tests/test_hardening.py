"""Hostile replies and tasks: each is refused alone, with its reason, and the global state stays sound."""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedra_core.aggregation import clip_delta
from fedra_core.config import ConfigError, TaskRefused, experiment_from_dict, resolve_node
from fedra_core.task import check_layers, check_received, max_task_blocks
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import FedRA, FederationTooSmall, NodeInfo

NUM_LAYERS = 4


def _state() -> dict[str, torch.Tensor]:
    state = {f"blocks.{i}.attn.proj.lora_A.weight": torch.randn(2, 3) for i in range(NUM_LAYERS)}
    state["head.weight"] = torch.randn(5, 3)
    return state


def _strategy(n: int = 2, **strategy: object) -> tuple[FedRA, StaticGrid]:
    experiment = experiment_from_dict({"clients": {"capacities": [NUM_LAYERS] * n}, "strategy": strategy,
                                       "training": {"local_steps": 2, "batch_size": 8}})
    fedra = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    ids = [100 + i for i in range(n)]
    fedra.nodes = {node: NodeInfo(node, i, NUM_LAYERS, f"d{i}", 10 * (i + 1)) for i, node in enumerate(ids)}
    return fedra, StaticGrid(ids)


def _reply(sent: Message, delta: dict[str, torch.Tensor], metrics: dict[str, object]) -> Message:
    content = RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, reply_to=sent)


def _ones(message: Message, value: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in message.content["arrays"].to_torch_state_dict().items()}


@pytest.mark.parametrize("metrics", [
    {"num-examples": float("inf")}, {"num-examples": float("nan")}, {"num-examples": [16]},
    {"num-examples": -3}, {"num-examples": 10**6},  # more than 2 steps x batch 8
    {"num-examples": 16, "train-loss": [1.0, 2.0]}, {"num-examples": 16, "train-accuracy": float("nan")},
])
def test_a_reply_with_a_bad_value_is_rejected_alone(metrics: dict[str, object]) -> None:
    strategy, grid = _strategy()
    state = _state()
    good, bad = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)

    arrays, _ = strategy.aggregate_train(1, [_reply(good, _ones(good, 0.5), {"num-examples": 16}),
                                             _reply(bad, _ones(bad, 100.0), metrics)])

    statuses = {c["node_id"]: c["status"] for c in strategy.last_record["clients"]}
    assert statuses == {100: "ok", 101: "rejected"}
    new_state = arrays.to_torch_state_dict()
    assert all(torch.allclose(new_state[k], v + 0.5) for k, v in state.items())


def test_client_metrics_cannot_overwrite_the_servers_record() -> None:
    strategy, grid = _strategy(weighting="num-examples")
    state = _state()
    first, second = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    hostile = {"num-examples": 16, "status": 1, "num_examples": 1.7e308, "node-id": 7, "partition_id": 9,
               "layers": 0, "bytes-sent": -1, "weight": 1e30, **{f"junk-{i}": 1.0 for i in range(50)},
               "train-loss": 0.5}

    arrays, _ = strategy.aggregate_train(1, [_reply(first, _ones(first, 1.0), {"num-examples": 16}),
                                             _reply(second, _ones(second, 4.0), hostile)])

    clients = {c["node_id"]: c for c in strategy.last_record["clients"]}
    record = clients[101]
    assert record["status"] == "ok" and record["partition_id"] == 1 and record["layers"] == [0, 1, 2, 3]
    assert record["bytes_sent"] > 0 and record["num_examples"] == 16
    assert record["metrics"] == {"train_loss": 0.5} and record["ignored_metrics"] == 57
    assert record["weight"] == 20 and clients[100]["weight"] == 10  # the declared dataset sizes
    new_state = arrays.to_torch_state_dict()
    expected = (10 * 1.0 + 20 * 4.0) / 30
    assert all(torch.allclose(new_state[k], v + expected) for k, v in state.items())


def test_num_examples_weighting_uses_the_declared_dataset_size() -> None:
    strategy, grid = _strategy(weighting="num-examples")
    state = _state()
    first, second = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    # Both saw 2 steps x 8 examples; their datasets hold 10 and 20.
    arrays, _ = strategy.aggregate_train(1, [_reply(first, _ones(first, 0.0), {"num-examples": 16}),
                                             _reply(second, _ones(second, 3.0), {"num-examples": 16})])
    new_state = arrays.to_torch_state_dict()
    assert all(torch.allclose(new_state[k], v + 2.0) for k, v in state.items())


def test_array_metadata_is_checked_before_decoding() -> None:
    strategy, grid = _strategy()
    good, bad = strategy.configure_train(1, ArrayRecord(_state()), ConfigRecord(), grid)
    lie = {k: Array(v.numpy()) for k, v in _ones(bad).items()}
    key = "head.weight"
    lie[key] = Array(dtype="float32", shape=(5, 3), stype="numpy.ndarray", data=b"\x00" * 10**6)
    reply = Message(RecordDict({"arrays": ArrayRecord(lie), "metrics": MetricRecord({"num-examples": 16})}),
                    reply_to=bad)
    calls: list[str] = []
    original = Array.numpy

    def spy(self: Array) -> np.ndarray:
        calls.append("decoded")
        return original(self)

    Array.numpy = spy  # type: ignore[method-assign]
    try:
        strategy.aggregate_train(1, [reply])
    finally:
        Array.numpy = original  # type: ignore[method-assign]
    reason = strategy.last_record["failures"][-1]["reason"]
    assert "head.weight: 1000000 serialized bytes for a (5, 3) float32 array" in reason
    assert calls == []


def test_a_declared_dtype_other_than_the_wire_dtype_is_rejected() -> None:
    strategy, grid = _strategy(n=1)
    (sent,) = strategy.configure_train(1, ArrayRecord(_state()), ConfigRecord(), grid)
    delta = {k: Array(v.numpy().astype(np.float64)) for k, v in _ones(sent).items()}
    reply = Message(RecordDict({"arrays": ArrayRecord(delta), "metrics": MetricRecord({"num-examples": 16})}),
                    reply_to=sent)
    strategy.aggregate_train(1, [reply])
    assert "dtype 'float64', expected 'float32'" in strategy.last_record["failures"][0]["reason"]


def test_huge_finite_deltas_never_make_the_state_non_finite() -> None:
    strategy, grid = _strategy()
    state = _state()
    first, second = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    replies = [_reply(m, _ones(m, 3e38), {"num-examples": 16}) for m in (first, second)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    once = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in once.values())

    first, second = strategy.configure_train(2, ArrayRecord(once), ConfigRecord(), grid)
    replies = [_reply(m, _ones(m, 3e38), {"num-examples": 16}) for m in (first, second)]
    arrays, metrics = strategy.aggregate_train(2, replies)

    twice = arrays.to_torch_state_dict()
    assert metrics is None and all(torch.equal(twice[k], v) for k, v in once.items())
    assert "overflowed" in strategy.last_record["aggregation"]["reason"]


def test_clipping_bounds_each_clients_step() -> None:
    strategy, grid = _strategy(clip_delta_norm=1.0)
    state = _state()
    first, second = strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, [_reply(first, _ones(first, 0.0), {"num-examples": 16}),
                                             _reply(second, _ones(second, 1e30), {"num-examples": 16})])
    new_state = arrays.to_torch_state_dict()
    moved = torch.cat([(new_state[k] - v).flatten() for k, v in state.items()]).norm()
    assert moved <= 0.5 + 1e-5  # one clipped client at norm 1, averaged with a zero delta
    clients = {c["node_id"]: c for c in strategy.last_record["clients"]}
    assert clients[101]["clipped"] and not clients[100]["clipped"] and clients[101]["delta_norm"] > 1e30


def test_clip_delta_keeps_small_deltas_and_scales_large_ones() -> None:
    small, norm = clip_delta({"a": torch.tensor([0.3, 0.4])}, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(small["a"], torch.tensor([0.3, 0.4]))
    large, norm = clip_delta({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(torch.cat([large["a"], large["b"]]), torch.tensor([0.6, 0.8]))


class _QueryGrid(StaticGrid):
    """Answers capacity queries with canned replies; a node without an answer stays silent."""

    def __init__(self, answers: dict[int, Callable[[Message], Message] | None]) -> None:
        super().__init__(list(answers))
        self.answers = answers
        self.asked: list[int] = []

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:  # type: ignore[override]
        self.asked += [m.metadata.dst_node_id for m in messages]
        return [answer(m) for m in messages if (answer := self.answers[m.metadata.dst_node_id])]


def _declare(**values: object) -> Callable[[Message], Message]:
    capacity = {"max-layers": 2, "partition-id": 0, "num-examples": 10, **values}

    def answer(message: Message) -> Message:
        content = RecordDict({"capacity": MetricRecord(capacity),  # type: ignore[arg-type]
                              "node": ConfigRecord({"domain": "clean"})})
        return Message(content, reply_to=message)
    return answer


@pytest.mark.parametrize("values, reason", [
    ({"num-examples": float("inf")}, "declared num-examples inf"),
    ({"num-examples": [1]}, "declared num-examples [1]"),
    ({"num-examples": 1.7e308}, "declared num-examples"),
    ({"max-layers": 2.5}, "declared max-layers 2.5"),
    ({"partition-id": -1}, "declared partition-id -1"),
])
def test_capacity_reply_with_a_bad_value_excludes_that_node_only(values: dict, reason: str) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2]}})
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    grid = _QueryGrid({1: _declare(), 2: _declare(**values)})
    strategy.discover(grid, wait_for=1)  # type: ignore[arg-type]
    assert list(strategy.nodes) == [1] and reason in strategy.excluded[2]


def test_a_deployed_node_claiming_a_tiny_federation_cannot_stop_the_run() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2]}})
    grid = _QueryGrid({1: _declare(), 2: _declare(**{"num-partitions": 1, "partition-id": 1})})
    deployed = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0), simulation=False)
    deployed.discover(grid, wait_for=2)  # type: ignore[arg-type]
    assert sorted(deployed.nodes) == [1, 2]

    simulated = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0), simulation=True)
    with pytest.raises(FederationTooSmall, match="num-supernodes=2"):
        simulated.discover(_QueryGrid({1: _declare(**{"num-partitions": 1})}), wait_for=2)  # type: ignore[arg-type]


def test_a_silent_node_is_asked_again_only_after_a_back_off() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2]}})
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    grid = _QueryGrid({1: _declare(), 2: None})
    strategy.discover(grid, wait_for=1)  # type: ignore[arg-type]
    for _ in range(5):  # five rounds in a row
        strategy.discover(grid)  # type: ignore[arg-type]
    assert grid.asked.count(2) == 1 and strategy.silent[2][0] == 1
    strategy.silent[2] = (1, 0.0)  # the back-off has passed
    strategy.discover(grid)  # type: ignore[arg-type]
    assert grid.asked.count(2) == 2 and strategy.silent[2][0] == 2


# ------------------------------------------------------------------ a server's task on a node
def test_a_node_enforces_its_own_limits_whatever_the_method() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [12, 3]}, "strategy": {"method": "all-large"}})
    deployed = resolve_node(experiment, {"partition-id": 1, "max-layers": 3})
    simulated = resolve_node(experiment, {"partition-id": 1, "num-partitions": 2})
    assert max_task_blocks(experiment, deployed, 12) == 3
    assert max_task_blocks(experiment, simulated, 12) == 12  # the ceiling baseline, in simulation
    with pytest.raises(TaskRefused, match="holds at most 3"):
        check_layers(list(range(12)), 12, max_task_blocks(experiment, deployed, 12))


@pytest.mark.parametrize("values, message", [
    ({"backbone": {"lora": {"rank": 1_000_000}}}, "backbone.lora.rank = 1000000, beyond this node's limit"),
    ({"training": {"batch_size": 10_000_000}}, "training.batch_size = 10000000"),
    ({"training": {"local_steps": 1_000_000_000}}, "training.local_steps = 1000000000"),
    ({"training": {"num_threads": 512}}, "training.num_threads = 512"),
    ({"training": {"loader_workers": 512}}, "training.loader_workers = 512"),
    ({"data": {"num_classes": 10_000_000}}, "data.num_classes = 10000000"),
])
def test_a_task_beyond_the_nodes_limits_is_refused(values: dict, message: str) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2]}, **values})
    with pytest.raises(TaskRefused, match=message.replace(".", r"\.")):
        resolve_node(experiment, {"partition-id": 0})


def test_node_config_sets_its_own_limits() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2]}, "training": {"batch_size": 64}})
    with pytest.raises(TaskRefused, match="max-batch-size=32"):
        resolve_node(experiment, {"partition-id": 0, "max-batch-size": 32})
    assert resolve_node(experiment, {"partition-id": 0, "max-batch-size": 64}).limits.max_batch_size == 64


@pytest.mark.parametrize("domain", ["../private_photos", "a/b", "..", ".", "", "/etc"])
def test_domain_names_are_plain_names(domain: str) -> None:
    with pytest.raises(ConfigError, match="data.domains"):
        experiment_from_dict({"data": {"domains": [domain]}})


def test_the_nodes_own_paths_win_over_the_experiments() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [2]},
                                       "data": {"dataset": "folder", "root": "/server/choice"},
                                       "backbone": {"cache": "/server/cache"}})
    node = resolve_node(experiment, {"partition-id": 0, "data-root": "/mine", "backbone-cache": "/my/cache"})
    assert node.data_root == "/mine" and str(node.backbone_cache) == "/my/cache"


@pytest.mark.parametrize("layers, message", [
    ("0,1", "list of block indices"), ([], "non-empty"), ([0, True], "integers"), ([0, 12], "outside 0..11"),
    ([2, 1], "distinct and ascending"), ([1, 1], "distinct and ascending"),
])
def test_bad_layer_lists_are_refused(layers: object, message: str) -> None:
    with pytest.raises(TaskRefused, match=message):
        check_layers(layers, 12, 12)


def test_received_arrays_are_checked_before_decoding() -> None:
    good = {"blocks.1.attn.proj.lora_A.weight": ("float32", (2, 3), 24 + 128), "head.weight": ("float32", (5,), 148)}
    check_received(good, [1], "float32")
    with pytest.raises(TaskRefused, match="block 2, which is not among its layers"):
        check_received({"blocks.2.attn.proj.lora_A.weight": ("float32", (2, 3), 152)}, [1], "float32")
    with pytest.raises(TaskRefused, match="serialized bytes"):
        check_received({"head.weight": ("float32", (10**9,), 100)}, [1], "float32")
