"""Baselines: allocations on the Strategy's messages, DepthFL's exits and loss, all-small, InclusiveFL."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch.utils.data import TensorDataset

from fedra_core import baselines
from fedra_core.config import NodeSettings, experiment_from_dict
from fedra_core.evaluation import GlobalModel
from fedra_core.local import run_local_round
from fedra_core.methods import method_for
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import FedRA, NodeInfo

NUM_LAYERS = 6
CAPACITIES = [6, 4, 3, 2]
NUM_CLASSES = 5


def _experiment(method: str, cache: Path | None = None, **strategy: object):  # noqa: ANN202
    values = {"clients": {"capacities": CAPACITIES}, "strategy": {"method": method, **strategy},
              "training": {"local_steps": 2, "batch_size": 8, "lr": 0.05}, "seed": 1,
              "backbone": {"lora": {"rank": 2, "alpha": 2, "dropout": 0.0}}}
    if cache is not None:
        values["backbone"]["cache"] = str(cache)
    return experiment_from_dict(values)


def _global_state() -> dict[str, torch.Tensor]:
    state = {f"blocks.{i}.attn.proj.lora_A.weight": torch.randn(2, 3) for i in range(NUM_LAYERS)}
    state["head.weight"] = torch.randn(5, 3)
    return state


def _sent_layers(method: str) -> list[list[int]]:
    strategy = FedRA(_experiment(method), NUM_LAYERS, np.random.default_rng(0))
    ids = [100 + i for i in range(len(CAPACITIES))]
    strategy.nodes = {n: NodeInfo(n, i, CAPACITIES[i], f"d{i}", 10) for i, n in enumerate(ids)}
    messages = list(strategy.configure_train(1, ArrayRecord(_global_state()), ConfigRecord(), StaticGrid(ids)))
    layers = [list(m.content["config"]["layers"]) for m in messages]
    for message, held in zip(messages, layers):  # the arrays sent are exactly the held blocks' and the head
        blocks = {int(k.split(".")[1]) for k in message.content["arrays"].keys() if k.startswith("blocks.")}
        assert blocks == set(held) and "head.weight" in message.content["arrays"].keys()
    return layers


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("all-large", [list(range(6))] * 4),
        ("all-small", [[0, 1]] * 4),
        ("inclusivefl", [list(range(6)), [0, 1, 2, 3], [0, 1, 2], [0, 1]]),
        ("depthfl", [list(range(6)), [0, 1, 2, 3], [0, 1, 2], [0, 1]]),
    ],
)
def test_depth_methods_send_the_blocks_they_define(method: str, expected: list[list[int]]) -> None:
    assert _sent_layers(method) == expected


@pytest.mark.parametrize("method", ["fedra", "fedra-cover"])
def test_fedra_methods_send_capacity_many_random_blocks(method: str) -> None:
    layers = _sent_layers(method)
    assert [len(held) for held in layers] == CAPACITIES
    assert layers[1:] != [list(range(k)) for k in CAPACITIES[1:]]  # not depth-first (fixed seed)


def test_exit_blocks_every_third_block_before_the_head() -> None:
    assert baselines.exit_blocks(3, 12) == [2, 5, 8]
    assert baselines.exit_blocks(3, 6) == [2]
    assert baselines.exit_blocks(2, 6) == [1, 3]


def test_all_small_global_model_is_the_shallow_model(tiny_vit_cache: Path) -> None:
    experiment = _experiment("all-small", tiny_vit_cache)
    layers = method_for(experiment).global_layers(NUM_LAYERS)
    model = GlobalModel(tiny_vit_cache, NUM_CLASSES, method_for(experiment))
    blocks = {int(k.split(".")[1]) for k in model.initial_state() if k.startswith("blocks.")}
    assert layers == [0, 1] and blocks == {0, 1} and len(model.model.blocks) == 2
    assert method_for(_experiment("fedra")).global_layers(NUM_LAYERS) is None


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(16, 3, 16, 16, generator=generator), torch.arange(16) % NUM_CLASSES)


def _local_round(method: str, cache: Path, layers: list[int], server_round: int = 1,
                 **strategy: object) -> tuple[dict[str, torch.Tensor], dict]:
    experiment = _experiment(method, cache, depthfl_exit_every=2, **strategy)
    initial = GlobalModel(cache, NUM_CLASSES, method_for(experiment)).initial_state()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # LoRA B starts at zero; non-zero
        torch.manual_seed(0)  # values (the same in every call) let every adapter get a gradient
        initial = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v) for k, v in initial.items()}
    node = NodeSettings(0, 1, max(layers) + 1, None, cache, "cpu")
    received = {k: v for k, v in initial.items()
                if not k.startswith("blocks.") or int(k.split(".")[1]) in layers}
    local = run_local_round(experiment, node, layers, received, _data(), NUM_CLASSES, server_round)
    return local.delta, initial


def test_depthfl_exits_are_global_state_and_change_the_result(tiny_vit_cache: Path) -> None:
    layers = [0, 1, 2, 3]
    depthfl, initial = _local_round("depthfl", tiny_vit_cache, layers)
    plain, _ = _local_round("inclusivefl", tiny_vit_cache, layers)

    exits = {k for k in initial if ".exit." in k}
    assert exits == {f"blocks.{i}.exit.{p}" for i in (1, 3) for p in ("weight", "bias")}
    assert {k for k in depthfl if ".exit." in k} == exits  # held exits trained and returned
    assert all(depthfl[k].abs().sum() > 0 for k in exits)
    shared = [k for k in plain if k in depthfl]
    assert shared and any(not torch.allclose(depthfl[k], plain[k]) for k in shared)


def test_depthfl_distill_weight_ramps_up_over_the_rounds() -> None:
    ramped = _experiment("depthfl", depthfl_distill_weight=2.0, depthfl_distill_ramp_rounds=100).strategy
    assert baselines.distill_weight(ramped, 1) == pytest.approx(2.0 * math.exp(-5 * 0.99 ** 2))
    assert baselines.distill_weight(ramped, 50) == pytest.approx(2.0 * math.exp(-5 * 0.25))
    assert baselines.distill_weight(ramped, 100) == baselines.distill_weight(ramped, 300) == 2.0
    assert baselines.distill_weight(_experiment("depthfl").strategy, 1) == 1.0  # no ramp: constant


def test_the_server_round_sets_the_clients_distillation_weight(tiny_vit_cache: Path) -> None:
    layers = [0, 1, 2, 3]
    constant, _ = _local_round("depthfl", tiny_vit_cache, layers, server_round=1)
    early, _ = _local_round("depthfl", tiny_vit_cache, layers, server_round=1, depthfl_distill_ramp_rounds=4)
    late, _ = _local_round("depthfl", tiny_vit_cache, layers, server_round=4, depthfl_distill_ramp_rounds=4)
    constant_late, _ = _local_round("depthfl", tiny_vit_cache, layers, server_round=4)

    assert any(not torch.allclose(early[k], constant[k]) for k in constant)  # weight exp(-5 * 0.75^2)
    for key in constant_late:  # from round R on, the ramp's weight is the constant one
        torch.testing.assert_close(late[key], constant_late[key])


def test_depthfl_loss_adds_distillation_to_every_classifier(tiny_vit_cache: Path) -> None:
    experiment = _experiment("depthfl", tiny_vit_cache, depthfl_exit_every=2)
    model = GlobalModel(tiny_vit_cache, NUM_CLASSES, method_for(experiment)).model
    images, labels = _data().tensors
    logits, with_kd = baselines.depthfl_loss(model, images[:8], labels[:8], distill_weight=1.0)
    _, without_kd = baselines.depthfl_loss(model, images[:8], labels[:8], distill_weight=0.0)
    plain = torch.nn.functional.cross_entropy(model(images[:8]), labels[:8])
    assert logits.shape == (8, NUM_CLASSES)
    assert without_kd > plain and with_kd > without_kd  # 3 cross-entropies (2 exits + head), then KL
    with_kd.backward()
    assert model.blocks[1].exit.weight.grad is not None and model.blocks[3].exit.weight.grad.abs().sum() > 0


def _lora(depth: int, value: float) -> dict[str, torch.Tensor]:
    """A depth-first delta: blocks 0..depth-1, every entry ``value + block``, and the head."""
    delta = {f"blocks.{b}.attn.proj.lora_A.weight": torch.full((2,), value + b) for b in range(depth)}
    return delta | {"head.weight": torch.full((2,), value)}


def test_inclusivefl_reference_form_distils_last_rounds_extra_blocks_into_the_top_block() -> None:
    zeros = {k: torch.zeros(2) for k in _lora(4, 0.0)}
    momentum: dict[str, torch.Tensor] = {}

    first = baselines.inclusivefl_aggregate(zeros, [_lora(4, 10.0), _lora(2, 0.0)], momentum, mix=0.2)
    second = baselines.inclusivefl_aggregate(zeros, [_lora(4, 20.0), _lora(2, 0.0)], momentum, mix=0.2)

    top = "blocks.1.attn.proj.lora_A.weight"
    # round 1: no earlier delta of depth 4 -> plain mean over the depth groups
    torch.testing.assert_close(first[top], torch.full((2,), (11.0 + 1.0) / 2))
    # round 2: depth 2's top delta is 0.8 * 1 + 0.2 * mean(round 1's depth-4 blocks 2, 3 = 12, 13)
    distilled = 0.8 * 1.0 + 0.2 * 12.5
    torch.testing.assert_close(second[top], torch.full((2,), (21.0 + distilled) / 2))
    torch.testing.assert_close(second["blocks.0.attn.proj.lora_A.weight"], torch.full((2,), 10.0))
    torch.testing.assert_close(second["blocks.3.attn.proj.lora_A.weight"], torch.full((2,), 23.0))
    torch.testing.assert_close(second["head.weight"], torch.full((2,), 10.0))  # heads are not distilled
    assert momentum[baselines.momentum_key(2, top)][0].item() == pytest.approx(distilled)
    assert set(momentum) == {baselines.momentum_key(4, f"blocks.{b}.attn.proj.lora_A.weight") for b in range(4)} \
        | {baselines.momentum_key(2, f"blocks.{b}.attn.proj.lora_A.weight") for b in range(2)}


def test_inclusivefl_averages_within_a_depth_first_then_across_depths() -> None:
    zeros = {k: torch.zeros(2) for k in _lora(2, 0.0)}
    out = baselines.inclusivefl_aggregate(zeros, [_lora(2, 0.0), _lora(2, 4.0), _lora(1, 8.0)], {}, mix=0.2)
    # block 0: depth 2's mean (0 + 4) / 2 = 2 and depth 1's 8 count once each -> 5, not 12 / 3
    torch.testing.assert_close(out["blocks.0.attn.proj.lora_A.weight"], torch.full((2,), 5.0))
    with pytest.raises(ValueError, match="depth-first"):
        baselines.inclusivefl_aggregate(zeros, [{"blocks.1.attn.proj.lora_A.weight": torch.ones(2)}], {}, mix=0.2)


def test_strategy_keeps_inclusivefl_momentum_across_rounds() -> None:
    experiment = _experiment("inclusivefl", inclusivefl_momentum=0.2)
    strategy = FedRA(experiment, NUM_LAYERS, np.random.default_rng(0))
    ids = [100 + i for i in range(len(CAPACITIES))]
    strategy.nodes = {n: NodeInfo(n, i, CAPACITIES[i], f"d{i}", 10) for i, n in enumerate(ids)}
    state = ArrayRecord(_global_state())
    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, state, ConfigRecord(), StaticGrid(ids)))
        replies = [Message(RecordDict({"arrays": ArrayRecord({k: torch.ones_like(v) * (1 + i) for k, v in
                                                              m.content["arrays"].to_torch_state_dict().items()}),
                                       "metrics": MetricRecord({"num-examples": 8})}), reply_to=m)
                   for i, m in enumerate(messages)]
        expected = baselines.inclusivefl_aggregate(state.to_torch_state_dict(),
                                                   [r.content["arrays"].to_torch_state_dict() for r in replies],
                                                   {k: v.clone() for k, v in strategy.method.memory.items()}, 0.2)
        state, _ = strategy.aggregate_train(server_round, replies)
        for key, value in state.to_torch_state_dict().items():
            torch.testing.assert_close(value, expected[key])
    assert baselines.momentum_key(4, "blocks.3.attn.proj.lora_A.weight") in strategy.method.memory


def test_depthfl_is_scored_by_its_deepest_classifier_and_by_the_ensemble(tiny_vit_cache: Path) -> None:
    experiment = _experiment("depthfl", tiny_vit_cache, depthfl_exit_every=2)
    model = GlobalModel(tiny_vit_cache, NUM_CLASSES, method_for(experiment))
    state = {k: torch.randn_like(v) for k, v in model.initial_state().items()}  # exits that disagree

    result = model.evaluate(state, {"toy": _data()}, batch_size=5)["toy"]

    images, labels = _data().tensors
    with torch.no_grad():
        outputs = baselines.classifier_logits(model.model, images)
    assert len(outputs) == 3  # exits after blocks 1 and 3, then the head
    deepest = (outputs[-1].argmax(dim=1) == labels).float().mean().item()
    ensemble = (torch.stack(outputs).mean(dim=0).argmax(dim=1) == labels).float().mean().item()
    assert result["accuracy"] == pytest.approx(deepest) and result["ensemble_accuracy"] == pytest.approx(ensemble)
    assert method_for(_experiment("inclusivefl")).classifiers() is None


def test_round_records_and_results_table_carry_the_ensemble() -> None:
    from fedra_core.run import ensemble_record, results_table

    results = {"a": {"accuracy": 0.5, "ensemble_accuracy": 0.6}, "b": {"accuracy": 0.3, "ensemble_accuracy": 0.4}}
    extra = ensemble_record(results)
    assert extra == {"ensemble_accuracy": {"a": 0.6, "b": 0.4}, "mean_ensemble_accuracy": pytest.approx(0.5)}
    assert ensemble_record({"a": {"accuracy": 0.5}}) == {}
    record = {"round": 3, "accuracy": {"a": 0.5, "b": 0.3}, "mean_accuracy": 0.4, **extra}
    assert "| round 3, ensemble | 60.0 | 40.0 | **50.0** |" in results_table([record]).splitlines()
