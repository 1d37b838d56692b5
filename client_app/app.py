"""The ClientApp: declare capacity, train the held blocks' adapters, evaluate the global model.

Each handler turns Flower's records into plain values and hands them to the node's warm
worker (``client_app.worker``: torch, timm, peft imported, data loaded, across rounds) or,
when there is none ready, runs the same task here (``fedra_core.task``).
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app import worker
from client_app.forkserver import FORKED_ENV
from fedra_core.task import RawArrays, TaskRefused, run_calibrate, run_evaluate, run_query, run_train
from fedra_core.wire import PACKED, PACKED_STYPE, WireError, is_packed, pack, unpack_numpy

app = ClientApp()


def _raw(record: ArrayRecord) -> RawArrays:
    """An ArrayRecord, packed or not, as (dtype, shape, ``.npy`` bytes) per name: nothing decoded yet."""
    if not is_packed(record):
        return {name: (array.dtype, tuple(array.shape), array.data) for name, array in record.items()}
    try:
        items = unpack_numpy(record[PACKED].data)
    except WireError as err:
        raise TaskRefused(f"the task's arrays: {err}") from err
    return {name: (dtype, shape, data) for name, dtype, shape, _, data in items}


def _reply_record(delta: dict[str, Any], packed: bool) -> ArrayRecord:
    """The reply's arrays, packed into one when the task came packed."""
    arrays = {k: Array(v) for k, v in delta.items()}
    if not packed:
        return ArrayRecord(arrays)
    blob = pack([(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in arrays.items()])
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def _run(kind: str, message: Message, context: Context) -> Any:
    """The task's result from the node's warm worker, or computed in this process."""
    config = dict(message.content["config"])
    arrays = _raw(message.content["arrays"]) if kind != "query" else {}
    node_config = dict(context.node_config)
    result = worker.call(kind, config, arrays, node_config)
    if result is not None:
        if kind != "query":
            (result[1] if kind in ("train", "calibrate") else result)["worker"] = 1  # served warm: seen in rounds.jsonl
        return result
    worker.pin_training()  # no worker: this process trains, on the node's cores
    if kind == "query":
        return run_query(config, node_config)
    if kind == "train":
        return run_train(config, arrays, node_config)
    if kind == "calibrate":
        return run_calibrate(config, arrays, node_config)
    return run_evaluate(config, arrays, node_config)


def _arrival(message: Message) -> dict[str, float]:
    """In a deployed ClientApp process: seconds from the message's creation (server clock) and
    from this process's start to now, where the handler begins (``wait-seconds``, ``startup-seconds``);
    ``forked`` 1 when the process came from its SuperNode's fork server (``client_app.forkserver``)."""
    if Path(sys.argv[0]).name != "flwr-clientapp":
        return {}
    out = {"wait-seconds": max(time.time() - message.metadata.created_at, 0.0),
           "forked": float(os.environ.get(FORKED_ENV) == "1")}
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # starttime
        out["startup-seconds"] = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return out


@app.query()
def query(message: Message, context: Context) -> Message:
    """Declare this node's capacity (``max-layers``), partition, domain, data size and backbone."""
    metrics, node = _run("query", message, context)
    config = ConfigRecord({**node, "pid": os.getpid()})
    return Message(RecordDict({"capacity": MetricRecord(metrics), "node": config}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Assemble the sub-model of the sent blocks, train it locally, reply with the deltas."""
    start, arrival = time.perf_counter(), _arrival(message)
    delta, metrics = _run("train", message, context)
    metrics["total-seconds"] = time.perf_counter() - start
    metrics.update(arrival)
    wire = _reply_record(delta, is_packed(message.content["arrays"]))
    return Message(RecordDict({"arrays": wire, "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Score the whole global model on this node's own test split (``evaluation.mode`` clients or both)."""
    metrics = _run("evaluate", message, context)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate("calibrate")
def calibrate(message: Message, context: Context) -> Message:
    """Sums of the whole global model's features on this node's training images (``strategy.head_calibration``)."""
    start = time.perf_counter()
    stats, metrics = _run("calibrate", message, context)
    metrics["total-seconds"] = time.perf_counter() - start
    wire = _reply_record(stats, is_packed(message.content["arrays"]))
    return Message(RecordDict({"arrays": wire, "metrics": MetricRecord(metrics)}), reply_to=message)
