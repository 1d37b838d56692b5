"""The project's ClientApp, whose replies some partitions corrupt on purpose.

- partition 0: honest.
- partition 1: ``num-examples`` of inf, then NaN.
- partition 2: metrics that try to overwrite the server's record (round 1), then a
  list-valued ``train-loss``.
- partition 3: a poisoned delta of 3.3e38 in every tensor, every round.
- partition 4: declares ``num-examples`` of inf in the capacity query.

Head calibration (every round): partition 0 honest; partition 1 class sums no features
can have; partition 2 counts far beyond its data; partition 3 a NaN in its gram matrix.
"""

import math

import numpy as np

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import calibrate as project_calibrate
from client_app.app import query as project_query
from client_app.app import train as project_train

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.query()
def query(message: Message, context: Context) -> Message:
    """Declare capacity honestly, except partition 4."""
    reply = project_query(message, context)
    if _partition(context) == 4:
        capacity = dict(reply.content.metric_records["capacity"])
        capacity["num-examples"] = math.inf
        content = RecordDict({"capacity": MetricRecord(capacity), "node": reply.content.config_records["node"]})
        return Message(content, reply_to=message)
    return reply


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train honestly, then corrupt the reply as the partition's role says."""
    reply = project_train(message, context)
    partition, server_round = _partition(context), int(message.content["config"]["server-round"])
    arrays = reply.content.array_records["arrays"]
    metrics = dict(reply.content.metric_records["metrics"])
    if partition == 1:
        metrics["num-examples"] = math.inf if server_round == 1 else math.nan
    elif partition == 2 and server_round == 1:
        metrics.update({"status": 1, "num_examples": 1.7e308, "node-id": 7, "partition-id": 9, "layers": 0,
                        "bytes-sent": -1, **{f"junk-{i}": float(i) for i in range(200)}})
    elif partition == 2:
        metrics["train-loss"] = [1.0, 2.0]
    elif partition == 3:
        arrays = ArrayRecord({k: Array(a.numpy() * 0 + 3.3e38) for k, a in arrays.items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=message)


@app.evaluate("calibrate")
def calibrate(message: Message, context: Context) -> Message:
    """Compute the calibration sums honestly, then corrupt them as the partition's role says."""
    reply = project_calibrate(message, context)
    arrays = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    partition = _partition(context)
    if partition == 1:
        arrays["calibration.sums"] = arrays["calibration.sums"] * 50
    elif partition == 2:
        arrays["calibration.counts"] = arrays["calibration.counts"] * 1000
    elif partition == 3:
        arrays["calibration.gram"] = np.full_like(arrays["calibration.gram"], np.nan)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": reply.content.metric_records["metrics"]}),
                   reply_to=message)
