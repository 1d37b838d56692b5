"""The ClientApp: declare capacity, then train the held blocks' adapters each round."""

import json
import os
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedra_core.backbone import CacheMeta, read_meta
from fedra_core.config import Experiment, NodeSettings, TaskRefused, experiment_from_dict, resolve_node
from fedra_core.datasets import ClientData, client_data
from fedra_core.task import check_layers, check_received, max_task_blocks
from fedra_core.wire import decode, encode

app = ClientApp()


def _setup(message: Message, context: Context) -> tuple[Experiment, NodeSettings, CacheMeta, ClientData]:
    """The experiment sent by the server, this node's settings, its backbone cache and its local data."""
    experiment = experiment_from_dict(json.loads(str(message.content["config"]["experiment"])))
    node = resolve_node(experiment, dict(context.node_config))
    if experiment.training.num_threads:
        import torch

        torch.set_num_threads(experiment.training.num_threads)
    meta = read_meta(node.backbone_cache)
    return experiment, node, meta, client_data(experiment, node, meta)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Declare this node's capacity (``max-layers``), partition, domain, data size and backbone."""
    _, node, meta, data = _setup(message, context)
    metrics = MetricRecord({"max-layers": node.max_layers, "partition-id": node.partition_id,
                            "num-partitions": node.num_partitions, "num-examples": len(data.train),
                            "backbone-layers": meta.num_layers})
    config = ConfigRecord({"domain": data.domain, "device": node.device, "pid": os.getpid(),
                           "backbone-source": meta.source})
    return Message(RecordDict({"capacity": metrics, "node": config}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Assemble the sub-model of the sent blocks, train it locally, reply with the deltas."""
    start = time.perf_counter()
    from fedra_core.local import run_local_round  # torch models and peft: only needed to train

    experiment, node, meta, data = _setup(message, context)
    config = message.content["config"]
    layers = check_layers(config.get("layers"), meta.num_layers, max_task_blocks(experiment, node, meta.num_layers))
    wire_dtype = str(config.get("wire-dtype", "float32"))
    arrays = message.content["arrays"]
    check_received({k: (a.dtype, a.shape, len(a.data)) for k, a in arrays.items()}, layers, wire_dtype)
    server_round = config.get("server-round")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise TaskRefused(f"the task's server-round {server_round!r} is not a round number")
    received = decode({k: a.numpy() for k, a in arrays.items()})
    local = run_local_round(experiment, node, layers, received, data.train, data.num_classes, server_round)
    metrics = MetricRecord({
        "num-examples": local.result.num_examples,
        "train-loss": local.result.loss,
        "train-accuracy": local.result.accuracy,
        "train-seconds": local.result.seconds,
        "setup-seconds": local.setup_seconds,
        "total-seconds": time.perf_counter() - start,
        "images-per-second": local.result.images_per_second,
        "bytes-read": local.assembly.bytes_read,
        "steps": local.result.steps,
    })
    wire = {k: Array(v) for k, v in encode(local.delta, wire_dtype).items()}
    return Message(RecordDict({"arrays": ArrayRecord(wire), "metrics": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the whole global model on this node's own test split (``evaluation.mode`` clients or both)."""
    from fedra_core.federated import evaluate_on_node  # torch models and peft: only needed to evaluate

    experiment, node, meta, data = _setup(message, context)
    if not experiment.evaluation.on_clients:
        raise TaskRefused(f"evaluation.mode is {experiment.evaluation.mode!r}: nodes are not asked to evaluate")
    config = message.content["config"]
    wire_dtype = str(config.get("wire-dtype", "float32"))
    arrays = message.content["arrays"]
    check_received({k: (a.dtype, a.shape, len(a.data)) for k, a in arrays.items()}, range(meta.num_layers),
                   wire_dtype)
    state = decode({k: a.numpy() for k, a in arrays.items()})
    start = time.perf_counter()
    result = evaluate_on_node(experiment, node.backbone_cache, meta.num_layers, data.num_classes, data.test,
                              state, node.device)
    metrics = {"eval-loss": result["loss"], "eval-accuracy": result["accuracy"],
               "num-examples": result["num_examples"], "eval-seconds": time.perf_counter() - start}
    if "ensemble_accuracy" in result:
        metrics["eval-ensemble-accuracy"] = result["ensemble_accuracy"]
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
