"""A server's train task, read as untrusted input by the node before it does any work."""

from collections.abc import Mapping, Sequence
from typing import Any

from fedra_core.config import Experiment, NodeSettings, TaskRefused
from fedra_core.wire import WireError, check_array_meta


def max_task_blocks(experiment: Experiment, node: NodeSettings, num_layers: int) -> int:
    """Most blocks this node trains: its own limit always; the method may lift only the experiment's.

    In simulation a partition's capacity comes from the experiment, and the ``all-large``
    ceiling sends every block. A node whose own node-config sets ``max-layers`` or
    ``memory-budget-mb`` is never sent more, whatever the method.
    """
    from fedra_core.methods import method_for

    allowed = method_for(experiment).max_blocks(node.max_layers, num_layers)
    return min(allowed, node.own_max_layers) if node.own_max_layers is not None else allowed


def check_layers(raw: Any, num_layers: int, limit: int) -> list[int]:
    """The task's ``layers``: distinct ascending block indices in ``0..num_layers-1``, at most ``limit``.

    Raises
    ------
    TaskRefused
        Naming what is wrong with the list.
    """
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TaskRefused(f"the task's layers must be a list of block indices, got {type(raw).__name__}")
    layers = list(raw)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TaskRefused(f"the task's layers must be a non-empty list of integers, got {layers[:8]!r}")
    if any(not 0 <= i < num_layers for i in layers):
        raise TaskRefused(f"the task's layers {layers} are outside 0..{num_layers - 1}")
    if layers != sorted(set(layers)):
        raise TaskRefused(f"the task's layers {layers} are not distinct and ascending")
    if len(layers) > limit:
        raise TaskRefused(f"the server sent {len(layers)} blocks but this node holds at most {limit}")
    return layers


def check_received(arrays: Mapping[str, tuple[str, Sequence[int], int]], layers: Sequence[int],
                   wire_dtype: str) -> None:
    """Check the received arrays' metadata before decoding them.

    Parameters
    ----------
    arrays : Mapping[str, tuple[str, Sequence[int], int]]
        Name -> (dtype, shape, serialized bytes) of every received array.
    layers : Sequence[int]
        The blocks of the task: a block tensor of another block is refused.
    wire_dtype : str
        The wire dtype the task names.
    """
    from fedra_core.lora import block_of  # peft: imported only where a node trains

    held = set(layers)
    for name, (dtype, shape, nbytes) in arrays.items():
        block = block_of(name)
        if block is not None and block not in held:
            raise TaskRefused(f"the task sends {name} of block {block}, which is not among its layers")
        try:
            check_array_meta(name, dtype, shape, nbytes, None, wire_dtype)
        except WireError as err:
            raise TaskRefused(f"the task's arrays: {err}") from err


# ---------------------------------------------------------------- running a task
# A task's arrays travel as Flower serializes them: dtype, shape and the ``.npy`` bytes.
RawArrays = Mapping[str, tuple[str, Sequence[int], bytes]]


def decode_raw(arrays: RawArrays) -> dict[str, Any]:
    """The arrays as NumPy, each checked to be what its metadata declared (no pickles)."""
    import io

    import numpy as np

    from fedra_core.wire import check_decoded

    out = {}
    for name, (dtype, shape, data) in arrays.items():
        try:
            out[name] = np.load(io.BytesIO(data), allow_pickle=False)
            check_decoded(name, out[name], dtype, shape)
        except (ValueError, OSError, EOFError) as err:
            raise TaskRefused(f"the task's array {name} cannot be read: {err}") from err
    return out


def setup(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple:
    """The experiment sent by the server, this node's settings, its backbone cache and its local data."""
    import json

    from fedra_core.backbone import read_meta
    from fedra_core.config import experiment_from_dict, resolve_node
    from fedra_core.datasets import client_data

    try:
        values = json.loads(str(config["experiment"]))
    except (KeyError, ValueError) as err:
        raise TaskRefused(f"the task carries no readable experiment: {err}") from err
    experiment = experiment_from_dict(values)
    node = resolve_node(experiment, node_config)
    if experiment.training.num_threads:
        import torch

        torch.set_num_threads(experiment.training.num_threads)
    meta = read_meta(node.backbone_cache)
    return experiment, node, meta, client_data(experiment, node, meta)


def run_query(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """This node's capacity declaration: (metrics, node facts)."""
    _, node, meta, data = setup(config, node_config)
    metrics = {"max-layers": node.max_layers, "partition-id": node.partition_id,
               "num-partitions": node.num_partitions, "num-examples": len(data.train),
               "backbone-layers": meta.num_layers}
    return metrics, {"domain": data.domain, "device": node.device, "backbone-source": meta.source}


def task_architecture(config: Mapping[str, Any], experiment: Experiment) -> str | None:
    """The backbone architecture the task names: one of the experiment's for a heterogeneous method, else none."""
    from fedra_core.methods import method_for

    value = config.get("architecture")
    names = experiment.backbone.architecture_names
    if not method_for(experiment).heterogeneous:
        if value is not None:
            raise TaskRefused(f"the task names architecture {value!r} but its method mixes no architectures")
        return None
    if not isinstance(value, str) or value not in names:
        raise TaskRefused(f"the task's architecture {value!r} is not one of the experiment's {names}")
    return value


def _server_round(config: Mapping[str, Any]) -> int:
    value = config.get("server-round")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TaskRefused(f"the task's server-round {value!r} is not a round number")
    return value


def run_train(config: Mapping[str, Any], arrays: RawArrays, node_config: Mapping[str, Any]
              ) -> tuple[dict[str, Any], dict[str, float]]:
    """Train the sent blocks' adapters on local data: (delta arrays in the wire dtype, metrics)."""
    from fedra_core.local import run_local_round  # torch models and peft: only needed to train
    from fedra_core.wire import decode, encode

    experiment, node, meta, data = setup(config, node_config)
    layers = check_layers(config.get("layers"), meta.num_layers, max_task_blocks(experiment, node, meta.num_layers))
    wire_dtype = str(config.get("wire-dtype", "float32"))
    check_received({k: (d, s, len(b)) for k, (d, s, b) in arrays.items()}, layers, wire_dtype)
    server_round = _server_round(config)
    architecture = task_architecture(config, experiment)
    received = decode(decode_raw(arrays))
    local = run_local_round(experiment, node, layers, received, data.train, data.num_classes, server_round,
                            architecture)
    metrics = {
        "num-examples": local.result.num_examples, "train-loss": local.result.loss,
        "train-accuracy": local.result.accuracy, "train-seconds": local.result.seconds,
        "setup-seconds": local.setup_seconds, "images-per-second": local.result.images_per_second,
        "bytes-read": local.assembly.bytes_read, "steps": local.result.steps,
    }
    return encode(local.delta, wire_dtype), metrics


def run_calibrate(config: Mapping[str, Any], arrays: RawArrays, node_config: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """Head-calibration sums of the whole global model's features on local training images: (arrays, metrics).

    The arrays are float32 whatever the wire dtype: the sums lose too much in bfloat16.
    """
    import time

    from fedra_core.federated import statistics_on_node, streams  # torch models and peft: only needed here
    from fedra_core.wire import decode, encode

    experiment, node, meta, data = setup(config, node_config)
    if not experiment.strategy.head_calibration:
        raise TaskRefused("strategy.head_calibration is off: nodes are not asked for calibration statistics")
    wire_dtype = str(config.get("wire-dtype", "float32"))
    check_received({k: (d, s, len(b)) for k, (d, s, b) in arrays.items()}, range(meta.num_layers), wire_dtype)
    state = decode(decode_raw(arrays))
    start = time.perf_counter()
    stats = statistics_on_node(experiment, node, meta, data, state)
    metrics = {"num-examples": stats.examples, "calibrate-seconds": time.perf_counter() - start,
               "streamed": float(streams(node, meta))}
    return encode(stats.to_arrays(), "float32"), metrics


def run_evaluate(config: Mapping[str, Any], arrays: RawArrays, node_config: Mapping[str, Any]) -> dict[str, float]:
    """Score the whole global model on this node's own test split (``evaluation.mode`` clients or both)."""
    import time

    from fedra_core.federated import evaluate_on_node  # torch models and peft: only needed to evaluate
    from fedra_core.wire import decode

    experiment, node, meta, data = setup(config, node_config)
    if not experiment.evaluation.on_clients:
        raise TaskRefused(f"evaluation.mode is {experiment.evaluation.mode!r}: nodes are not asked to evaluate")
    wire_dtype = str(config.get("wire-dtype", "float32"))
    check_received({k: (d, s, len(b)) for k, (d, s, b) in arrays.items()}, range(meta.num_layers), wire_dtype)
    state = decode(decode_raw(arrays))
    start = time.perf_counter()
    result = evaluate_on_node(experiment, node, meta, data, state)
    metrics = {"eval-loss": result["loss"], "eval-accuracy": result["accuracy"],
               "num-examples": result["num_examples"], "eval-seconds": time.perf_counter() - start}
    if "ensemble_accuracy" in result:
        metrics["eval-ensemble-accuracy"] = result["ensemble_accuracy"]
    return metrics
