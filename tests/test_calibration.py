"""Head calibration: sums that pool exactly, the discriminant head, hostile sums refused, streamed features."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from torch.utils.data import TensorDataset

from fedra_core.calibration import (
    COUNTS,
    GRAM,
    SUMS,
    CalibrationError,
    FeatureStats,
    calibrate_state,
    check_statistics,
    discriminant_head,
    head_features,
    oas_shrinkage,
    statistics,
)
from fedra_core.config import ConfigError, LoraSettings, experiment_from_dict
from fedra_core.evaluation import GlobalModel
from fedra_core.streaming import StreamedGlobalModel
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import CALIBRATE, FedRA, NodeInfo

DIM, CLASSES = 6, 4


def _blobs(n: int, seed: int, shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``n`` images in CLASSES Gaussian clusters with a shared, skewed covariance."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    centers = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(99)) * shift
    mixing = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(98))
    return centers[labels] + torch.randn(n, DIM, generator=g) @ mixing, labels


def _head() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(CLASSES, DIM), torch.zeros(CLASSES)


# ---------------------------------------------------------------- the mathematics
def test_sums_of_parts_pool_exactly_and_give_the_lda_of_all_features() -> None:
    features, labels = _blobs(300, seed=0)
    parts = [statistics(features[a:b], labels[a:b], CLASSES) for a, b in ((0, 70), (70, 200), (200, 300))]
    whole = statistics(features, labels, CLASSES)

    pooled = parts[0] + parts[1] + parts[2]
    weight, bias, info = discriminant_head(pooled, *_head(), shrinkage=0.0)

    torch.testing.assert_close(pooled.gram, whole.gram)
    x = features.double()
    means = torch.stack([x[labels == c].mean(0) for c in range(CLASSES)])
    centered = x - means[labels]
    expected = torch.linalg.solve(centered.T @ centered / len(x), means.T).T  # Sigma^-1 mu_c
    torch.testing.assert_close(weight.double(), expected, rtol=1e-4, atol=1e-4)
    assert info == {"examples": 300, "classes": CLASSES, "shrinkage": 0.0}


def test_the_discriminant_head_classifies_held_out_features() -> None:
    features, labels = _blobs(400, seed=1, shift=1.5)
    test_x, test_y = _blobs(400, seed=2, shift=1.5)

    weight, bias, info = discriminant_head(statistics(features, labels, CLASSES), *_head())

    accuracy = float(((test_x @ weight.T + bias).argmax(1) == test_y).float().mean())
    nearest_mean = torch.stack([features[labels == c].mean(0) for c in range(CLASSES)])
    baseline = float((torch.cdist(test_x, nearest_mean).argmin(1) == test_y).float().mean())
    assert accuracy > baseline + 0.05  # the shared covariance is used, not only the class means
    assert 0 <= info["shrinkage"] < 0.1  # 400 examples of 6 dims: little shrinkage needed


def test_classes_nobody_counted_keep_their_rows() -> None:
    features, labels = _blobs(200, seed=3)
    keep = labels != 2
    weight, bias = torch.full((CLASSES, DIM), 7.0), torch.full((CLASSES,), -1.0)

    new_weight, new_bias, info = discriminant_head(statistics(features[keep], labels[keep], CLASSES), weight, bias)

    assert torch.equal(new_weight[2], weight[2]) and new_bias[2] == -1.0
    assert not torch.equal(new_weight[0], weight[0]) and info["classes"] == CLASSES - 1


def test_one_class_or_a_head_of_another_size_is_refused() -> None:
    features, _ = _blobs(50, seed=4)
    with pytest.raises(CalibrationError, match="1 class"):
        discriminant_head(statistics(features, torch.zeros(50, dtype=torch.long), CLASSES), *_head())
    with pytest.raises(CalibrationError, match="the head is"):
        discriminant_head(statistics(*_blobs(50, seed=4), CLASSES), torch.zeros(3, DIM), torch.zeros(3))
    with pytest.raises(CalibrationError, match="no node"):
        calibrate_state({"head.weight": torch.zeros(CLASSES, DIM), "head.bias": torch.zeros(CLASSES)}, [])


def test_a_singular_covariance_without_shrinkage_is_refused_by_name() -> None:
    features, labels = _blobs(3, seed=11)  # 3 images of 6 dimensions: a singular covariance
    labels = torch.tensor([0, 1, 1])
    with pytest.raises(CalibrationError, match="singular"):
        discriminant_head(statistics(features, labels, CLASSES), *_head(), shrinkage=0.0)
    weight, _, info = discriminant_head(statistics(features, labels, CLASSES), *_head())  # OAS copes
    assert torch.isfinite(weight).all() and info["shrinkage"] > 0


def test_oas_shrinks_little_with_many_examples_and_fully_for_an_identity() -> None:
    features, _ = _blobs(5000, seed=5)
    covariance = torch.cov(features.double().T)
    assert oas_shrinkage(covariance, 5000) < oas_shrinkage(covariance, 20) <= 1.0
    assert oas_shrinkage(torch.eye(DIM, dtype=torch.float64), 10) == 1.0


# ---------------------------------------------------------------- hostile sums
def _arrays(stats: FeatureStats) -> dict[str, torch.Tensor]:
    return stats.to_arrays()


@pytest.mark.parametrize("corrupt, message", [
    ("extra-key", "exactly"),
    ("shape", "has shape"),
    ("nan", "NaN"),
    ("negative-count", "whole numbers"),
    ("fractional-count", "whole numbers"),
    ("too-many", "declared 300"),
    ("sum-without-count", "counted 0 times"),
    ("asymmetric", "not symmetric"),
    ("inconsistent", "inconsistent"),
])
def test_sums_no_set_of_features_can_have_are_refused(corrupt: str, message: str) -> None:
    features, labels = _blobs(300, seed=6)
    arrays = _arrays(statistics(features[labels != 3], labels[labels != 3], CLASSES))
    if corrupt == "extra-key":
        arrays["head.weight"] = torch.zeros(1)
    elif corrupt == "shape":
        arrays[SUMS] = torch.zeros(CLASSES + 1, DIM)
    elif corrupt == "nan":
        arrays[GRAM][0, 0] = float("nan")
    elif corrupt == "negative-count":
        arrays[COUNTS][0] = -1
    elif corrupt == "fractional-count":
        arrays[COUNTS][0] += 0.5
    elif corrupt == "too-many":
        arrays[COUNTS] = arrays[COUNTS] * 1000  # a node outweighing everyone
    elif corrupt == "sum-without-count":
        arrays[SUMS][3] = 1.0
    elif corrupt == "asymmetric":
        arrays[GRAM][0, 1] += 100.0
    else:
        arrays[SUMS] = arrays[SUMS] * 50  # class means far beyond what the gram allows

    with pytest.raises(CalibrationError, match=message):
        check_statistics(arrays, DIM, CLASSES, max_examples=300)


def test_real_sums_pass_the_checks() -> None:
    features, labels = _blobs(300, seed=7)
    stats = check_statistics(_arrays(statistics(features, labels, CLASSES)), DIM, CLASSES, max_examples=300)
    assert stats.examples == 300 and stats.gram.dtype == torch.float64


# ---------------------------------------------------------------- the server's step
class ReplyingGrid(StaticGrid):
    """A grid whose nodes answer calibration requests through ``respond(node_id, message)``."""

    def __init__(self, node_ids: list[int], respond) -> None:
        super().__init__(node_ids)
        self.respond = respond
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
        self.sent = list(messages)
        return [r for m in self.sent if (r := self.respond(m.metadata.dst_node_id, m)) is not None]


def _stats_reply(message: Message, arrays: dict[str, torch.Tensor]) -> Message:
    record = ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message)


def _calibrating_strategy(respond) -> tuple[FedRA, ReplyingGrid, dict[str, torch.Tensor]]:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2, 2, 2]},
                                       "strategy": {"head_calibration": "lda"}})
    strategy = FedRA(experiment, 2, np.random.default_rng(0))
    ids = [100, 101, 102, 103]
    strategy.nodes = {n: NodeInfo(n, i, 2, f"d{i}", 300) for i, n in enumerate(ids)}
    grid = ReplyingGrid(ids, respond)
    strategy.grid = grid
    state = {"blocks.0.attn.proj.lora_A.weight": torch.ones(2, DIM), "head.weight": torch.zeros(CLASSES, DIM),
             "head.bias": torch.zeros(CLASSES)}
    return strategy, grid, state


def test_the_server_uses_only_the_sound_replies_and_records_the_others() -> None:
    honest = {100: statistics(*_blobs(300, seed=8), CLASSES), 101: statistics(*_blobs(250, seed=9), CLASSES)}

    def respond(node_id: int, message: Message) -> Message | None:
        assert message.metadata.message_type == CALIBRATE
        assert set(message.content["arrays"].keys()) == {"blocks.0.attn.proj.lora_A.weight", "head.weight",
                                                         "head.bias"}  # the whole global model
        if node_id in honest:
            return _stats_reply(message, _arrays(honest[node_id]))
        if node_id == 102:
            poisoned = _arrays(honest[100])
            poisoned[SUMS] = poisoned[SUMS] * 50
            return _stats_reply(message, poisoned)
        return Message(Error(code=0, reason="ClientApp crashed"), reply_to=message)

    strategy, grid, state = _calibrating_strategy(respond)
    calibrated = strategy.calibrate(state, 3)

    expected, _, _ = discriminant_head(honest[100] + honest[101], state["head.weight"], state["head.bias"])
    torch.testing.assert_close(calibrated["head.weight"], expected, rtol=1e-4, atol=1e-3)  # float32 on the wire
    assert torch.equal(calibrated["blocks.0.attn.proj.lora_A.weight"], state["blocks.0.attn.proj.lora_A.weight"])
    record = strategy.last_record["calibration"]
    assert record["status"] == "ok" and record["nodes"] == 2 and record["examples"] == 550
    reasons = {f["node_id"]: (f["status"], f["reason"]) for f in record["failures"]}
    assert reasons[102][0] == "rejected" and "inconsistent" in reasons[102][1]
    assert reasons[103] == ("failed", "ClientApp crashed")


def test_with_no_sound_reply_the_state_is_unchanged() -> None:
    strategy, _, state = _calibrating_strategy(lambda node_id, message: None)
    assert strategy.calibrate(state, 1) is state
    record = strategy.last_record["calibration"]
    assert record["status"] == "skipped" and "no node" in record["reason"]
    assert all("no reply" in f["reason"] for f in record["failures"]) and len(record["failures"]) == 4


# ---------------------------------------------------------------- configuration
def test_calibration_is_due_after_every_nth_round_and_the_last() -> None:
    every = experiment_from_dict({"strategy": {"head_calibration": "lda", "calibrate_every": 4}}).strategy
    last = experiment_from_dict({"strategy": {"head_calibration": "lda"}}).strategy
    off = experiment_from_dict({}).strategy
    assert [r for r in range(11) if every.calibration_due(r, 10)] == [4, 8, 10]
    assert [r for r in range(11) if last.calibration_due(r, 10)] == [10]
    assert not any(off.calibration_due(r, 10) for r in range(11))


@pytest.mark.parametrize("values, message", [
    ({"strategy": {"head_calibration": "sgd"}}, "strategy.head_calibration"),
    ({"strategy": {"head_calibration": "lda", "calibrate_every": -1}}, "strategy.calibrate_every"),
    ({"strategy": {"head_calibration": "lda", "calibration_shrinkage": 1.5}}, "strategy.calibration_shrinkage"),
    ({"strategy": {"head_calibration": "lda"}, "backbone": {"lora": {"train_head": False}}}, "train_head"),
    ({"strategy": {"head_calibration": "lda", "method": "hetero"}}, "its own head"),
])
def test_bad_calibration_settings_are_refused_by_name(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(values)


# ---------------------------------------------------------------- features on a node
def test_streamed_features_equal_the_in_memory_model(tiny_vit_cache: Path) -> None:
    lora = LoraSettings(rank=4, target_modules=("attn.proj", "mlp.fc2"))
    model = GlobalModel.with_lora(tiny_vit_cache, 5, lora, seed=3)
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in model.initial_state().items()}
    images = torch.randn(9, 3, 16, 16, generator=generator)
    dataset = TensorDataset(images, torch.arange(9) % 5)
    model.load(state)

    expected, labels = head_features(model.model, dataset, batch_size=4)
    streamed, streamed_labels = StreamedGlobalModel(tiny_vit_cache, 5, lora, seed=3, batch_size=4).features(
        state, dataset)

    assert expected.shape == (9, model.model.num_features)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=0)
    assert torch.equal(streamed_labels, labels)


def test_clients_go_on_training_the_averaged_head_and_a_resume_keeps_it() -> None:
    stats = statistics(*_blobs(300, seed=10), CLASSES)
    strategy, grid, state = _calibrating_strategy(lambda node_id, message: _stats_reply(message, _arrays(stats)))
    strategy.experiment = experiment_from_dict({"clients": {"capacities": [2, 2, 2, 2]}, "training": {"rounds": 3},
                                                "strategy": {"head_calibration": "lda", "calibrate_every": 1}})
    strategy.cfg = strategy.experiment.strategy

    def train_round(server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        replies = [Message(RecordDict({"arrays": ArrayRecord({k: torch.full_like(v, 0.5) for k, v in
                                                              m.content["arrays"].to_torch_state_dict().items()}),
                                       "metrics": MetricRecord({"num-examples": 10})}), reply_to=m)
                   for m in messages]
        return strategy.aggregate_train(server_round, replies)[0]

    first = train_round(1, ArrayRecord(state)).to_torch_state_dict()
    averaged = state["head.weight"] + 0.5
    expected, _, _ = discriminant_head(stats + stats + stats + stats, averaged, state["head.bias"] + 0.5)  # 4 nodes
    torch.testing.assert_close(first["head.weight"], expected, rtol=1e-4, atol=1e-3)  # evaluated and saved
    torch.testing.assert_close(strategy.training_head["head.weight"], averaged)

    sent = list(strategy.configure_train(2, ArrayRecord(first), ConfigRecord(), grid))
    torch.testing.assert_close(sent[0].content["arrays"].to_torch_state_dict()["head.weight"], averaged)

    resumed, _, _ = _calibrating_strategy(lambda node_id, message: None)
    resumed.load_server_state(strategy.server_state())
    torch.testing.assert_close(resumed.training_head["head.weight"], averaged)
    plain = FedRA(experiment_from_dict({"clients": {"capacities": [2]}}), 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="head calibration"):
        plain.load_server_state(strategy.server_state())
