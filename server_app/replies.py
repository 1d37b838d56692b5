"""Clients' replies, read as untrusted input: every value is checked before the server uses it.

A reply that fails a check raises ``InvalidReply`` with the reason; the strategy then
rejects that reply only (the node is excluded, or its round counts as rejected) and the
run goes on. Arrays are checked by their metadata (names, dtype, shape, size) before any
byte is decoded.
"""

import math
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord, Message

from fedra_core.aggregation import InvalidReply, check_delta
from fedra_core.calibration import COUNTS, GRAM, SUMS, CalibrationError, FeatureStats, check_statistics
from fedra_core.lora import State
from fedra_core.wire import PACKED, WireError, check_array_meta, check_decoded, decode, is_packed, unpack_numpy

# Metrics a client may report about its round, with the record's name for each. Any
# other metric is ignored: a client never writes keys of its own into the run's records.
KNOWN_METRICS = {"train-loss": "train_loss", "train-accuracy": "train_accuracy",
                 "train-seconds": "train_seconds", "setup-seconds": "setup_seconds",
                 "total-seconds": "total_seconds", "images-per-second": "images_per_second",
                 "bytes-read": "bytes_read", "steps": "steps", "worker": "worker",
                 "wait-seconds": "wait_seconds", "startup-seconds": "startup_seconds", "forked": "forked"}
# What a node may report about its calibration (the rest is ignored), with the record's names.
CALIBRATION_METRICS = {"calibrate-seconds": "seconds", "streamed": "streamed", "worker": "worker",
                       "total-seconds": "total_seconds"}
MAX_EXAMPLES = 10**9  # more examples than any node holds: a declared size beyond is a lie
MAX_TEXT = 256  # longest domain name or backbone source accepted from a node


@dataclass(frozen=True)
class Capacity:
    """What a node declared in its reply to the capacity query, checked."""

    max_layers: int
    partition_id: int
    num_partitions: int | None
    num_examples: int
    backbone_layers: int | None
    domain: str
    backbone_source: str


@dataclass(frozen=True)
class TrainReply:
    """A checked train reply: the delta, the examples seen, the known metrics."""

    delta: State
    examples_seen: int
    metrics: dict[str, float]
    ignored_metrics: int
    bytes_received: int


def whole_number(value: Any, what: str, low: int = 0, high: int = MAX_EXAMPLES) -> int:
    """``value`` as an int in ``low..high``; ``InvalidReply`` for anything else (bool, inf, NaN, lists)."""
    whole = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        isinstance(value, int) or (math.isfinite(value) and value.is_integer()))
    if not whole or not low <= value <= high:
        raise InvalidReply(f"{what} {value!r} is not a whole number in {low}..{high}")
    return int(value)


def finite_number(value: Any, what: str) -> float:
    """``value`` as a finite float; ``InvalidReply`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidReply(f"{what} must be a finite number, got {value!r}")
    return float(value)


def short_text(value: Any, what: str) -> str:
    """A printable string of at most ``MAX_TEXT`` characters."""
    if not isinstance(value, str) or len(value) > MAX_TEXT or not value.isprintable():
        raise InvalidReply(f"{what} must be printable text of at most {MAX_TEXT} characters")
    return value


def read_capacity(reply: Message, num_clients: int) -> Capacity:
    """The checked content of a reply to the capacity query."""
    if reply.has_error():
        raise InvalidReply(f"capacity query failed: {reply.error.reason}")
    metrics = reply.content.metric_records.get("capacity")
    config = reply.content.config_records.get("node")
    if metrics is None or config is None:
        raise InvalidReply("reply to the capacity query lacks 'capacity' or 'node'")
    optional = {key: whole_number(metrics[key], f"declared {key}", 1, 10**6)
                for key in ("num-partitions", "backbone-layers") if key in metrics}
    return Capacity(
        max_layers=whole_number(metrics.get("max-layers"), "declared max-layers", 1, 10**6),
        partition_id=whole_number(metrics.get("partition-id"), "declared partition-id", 0, num_clients - 1),
        num_partitions=optional.get("num-partitions"),
        num_examples=whole_number(metrics.get("num-examples"), "declared num-examples", 1),
        backbone_layers=optional.get("backbone-layers"),
        domain=short_text(config.get("domain", ""), "declared domain"),
        backbone_source=short_text(config.get("backbone-source", ""), "declared backbone-source"),
    )


def unpacked(record: ArrayRecord) -> dict[str, Array]:
    """The arrays of a record, packed (``fedra_core.wire.pack``) or not; ``InvalidReply`` when unreadable."""
    if not is_packed(record):
        return dict(record.items())
    try:
        items = unpack_numpy(record[PACKED].data)
    except WireError as err:
        raise InvalidReply(str(err)) from err
    try:
        return {name: Array(dtype=dtype, shape=shape, stype=stype, data=data)
                for name, dtype, shape, stype, data in items}
    except (TypeError, ValueError) as err:  # Flower's own checks of an array's fields
        raise InvalidReply(f"packed arrays: {err}") from err


def read_arrays(record: ArrayRecord, sent: State, wire_dtype: str) -> State:
    """The delta in ``record`` (packed or not): the sent keys exactly, each checked by metadata, then decoded."""
    items = unpacked(record)
    keys = set(items)
    missing, extra = sorted(set(sent) - keys), sorted(keys - set(sent))
    if missing or extra:
        raise InvalidReply(f"keys differ from those sent: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {extra[:3]} ({len(extra)})")
    arrays = {}
    try:
        for key, array in items.items():
            check_array_meta(key, array.dtype, array.shape, len(array.data), sent[key].shape, wire_dtype)
        for key, array in items.items():
            arrays[key] = array.numpy()
            check_decoded(key, arrays[key], array.dtype, array.shape)
    except WireError as err:
        raise InvalidReply(str(err)) from err
    except (TypeError, ValueError, EOFError) as err:
        raise InvalidReply(f"arrays cannot be read: {err}") from err
    delta = decode(arrays)
    check_delta(delta, sent)
    return delta


def read_train_reply(reply: Message, sent: State, wire_dtype: str, max_examples: int) -> TrainReply:
    """The checked content of a train reply; ``InvalidReply`` when anything is absent or bad.

    Parameters
    ----------
    reply : Message
        The node's reply (not an error reply).
    sent : State
        The state the node was sent: the delta must have its keys and shapes.
    wire_dtype : str
        The wire dtype of the round.
    max_examples : int
        Most examples the node may claim to have seen in the round.
    """
    content = reply.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise InvalidReply("reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord")
    raw = content.metric_records["metrics"]
    seen = whole_number(raw.get("num-examples"), "num-examples", 1, max_examples)
    metrics = {KNOWN_METRICS[k]: finite_number(v, k) for k, v in raw.items() if k in KNOWN_METRICS}
    record = content.array_records["arrays"]
    delta = read_arrays(record, sent, wire_dtype)
    return TrainReply(delta, seen, metrics, sum(1 for k in raw if k not in KNOWN_METRICS and k != "num-examples"),
                      serialized_bytes(record))


def serialized_bytes(record: ArrayRecord) -> int:
    """Bytes of the record as Flower serializes it: the record and every array (chunk) in it."""

    def size(obj: object) -> int:
        children = getattr(obj, "children", None) or {}
        return len(obj.deflate()) + sum(size(child) for child in children.values())  # type: ignore[attr-defined]

    return size(record)


@dataclass(frozen=True)
class EvalReply:
    """A checked evaluate reply."""

    loss: float
    accuracy: float
    num_examples: int
    ensemble_accuracy: float | None


def read_eval_reply(reply: Message) -> EvalReply:
    """The checked content of an evaluate reply; ``InvalidReply`` when anything is absent or bad."""
    metrics = reply.content.metric_records.get("metrics")
    if metrics is None:
        raise InvalidReply("reply lacks the 'metrics' MetricRecord")
    loss = finite_number(metrics.get("eval-loss"), "eval-loss")
    accuracy = finite_number(metrics.get("eval-accuracy"), "eval-accuracy")
    ensemble = metrics.get("eval-ensemble-accuracy")
    ensemble = None if ensemble is None else finite_number(ensemble, "eval-ensemble-accuracy")
    if loss < 0 or not 0 <= accuracy <= 1 or not (ensemble is None or 0 <= ensemble <= 1):
        raise InvalidReply(f"eval-loss {loss} must be >= 0 and accuracies within 0..1")
    return EvalReply(loss, accuracy, whole_number(metrics.get("num-examples"), "num-examples", 1), ensemble)


def read_calibration_reply(reply: Message, dim: int, num_classes: int, max_examples: int
                           ) -> tuple[FeatureStats, int, dict[str, float]]:
    """The checked feature sums of a calibration reply, its bytes and its known metrics; ``InvalidReply`` when bad.

    Parameters
    ----------
    reply : Message
        The node's reply (not an error reply).
    dim, num_classes : int
        The head's input width and its classes: the sums' shapes.
    max_examples : int
        The node's declared training examples: the most images it can have counted.
    """
    import torch

    if "arrays" not in reply.content.array_records:
        raise InvalidReply("reply lacks the 'arrays' ArrayRecord")
    record = reply.content.array_records["arrays"]
    shapes = {GRAM: (dim, dim), SUMS: (num_classes, dim), COUNTS: (num_classes,)}
    arrays = read_arrays(record, {k: torch.empty(shape) for k, shape in shapes.items()}, "float32")
    raw = reply.content.metric_records.get("metrics") or {}
    metrics = {name: finite_number(raw[key], key) for key, name in CALIBRATION_METRICS.items() if key in raw}
    try:
        return check_statistics(arrays, dim, num_classes, max_examples), serialized_bytes(record), metrics
    except CalibrationError as err:
        raise InvalidReply(f"calibration statistics: {err}") from err
