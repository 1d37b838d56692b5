"""Evaluation where the data lives: a node scores the global model on its own test split.

The server then needs no test data: each node replies loss, accuracy and count, and
``aggregate_evaluations`` turns the replies into the round's per-domain accuracy, the
same figures the server computes from its own copy of every test set.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedra_core.config import ConfigError, Experiment
from fedra_core.methods import method_for


@dataclass(frozen=True)
class NodeEvaluation:
    """One node's evaluation of the global model on its own test split."""

    node_id: int
    partition_id: int
    domain: str
    loss: float
    accuracy: float
    num_examples: int
    ensemble_accuracy: float | None = None


def declared_num_classes(experiment: Experiment) -> int | None:
    """Size of the label space known without reading data: the built-in benchmark's, or ``data.num_classes``."""
    if experiment.data.dataset == "builtin-digits":
        from fedra_core.data.builtin import DIGIT_CLASSES

        return len(DIGIT_CLASSES)
    return experiment.data.num_classes


def require_num_classes(experiment: Experiment) -> int:
    """The label space for a server that holds no data; ``ConfigError`` when the experiment does not say it."""
    declared = declared_num_classes(experiment)
    if declared is None:
        raise ConfigError(f"evaluation.mode {experiment.evaluation.mode!r}: the server holds no test data, so "
                          f"data.num_classes must say the number of classes of dataset {experiment.data.dataset!r}")
    return declared


def global_model(experiment: Experiment, cache: Path, num_classes: int, device: str,
                 architecture: str | None = None) -> Any:
    """The method's evaluated global model on ``cache`` (the server's and every evaluating node's)."""
    from fedra_core.evaluation import GlobalModel  # timm and peft: only where a model is built

    return GlobalModel(cache, num_classes, method_for(experiment), device=device, architecture=architecture)


def streams(node: Any, meta: Any) -> bool:
    """Whether a node runs the full model block by block: its own ``max-layers`` (or memory budget) is below
    the depth."""
    return node.own_max_layers is not None and node.own_max_layers < meta.num_layers


def evaluate_on_node(experiment: Experiment, node: Any, meta: Any, data: Any,
                     state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Loss, accuracy and count of the global model under ``state`` on a node's test split.

    A node that holds every block evaluates the model in memory; one whose own
    ``max-layers`` (or memory budget) is below the depth streams the blocks from its
    cache one at a time: the same model, in the memory of a block or two.
    """
    device = node.device
    precision = experiment.training.precision if device != "cpu" else "fp32"
    if streams(node, meta):
        from fedra_core.streaming import stream_evaluate, without_exits  # DepthFL's exits are not streamed

        # A small node streams at its training batch size: a block's activations then fit
        # where its training did (blocks are read once whatever the batch).
        batch = min(experiment.training.eval_batch_size, experiment.training.batch_size)
        result = stream_evaluate(node.backbone_cache, without_exits(state), data.test,
                                 experiment.backbone.lora, data.num_classes, device, batch, experiment.seed,
                                 method_for(experiment).global_layers(meta.num_layers), precision)
        return {"loss": result.loss, "accuracy": result.accuracy, "num_examples": result.num_examples}
    model = global_model(experiment, node.backbone_cache, data.num_classes, device)
    return model.evaluate(state, {"local": data.test}, experiment.training.eval_batch_size, precision)["local"]


def statistics_on_node(experiment: Experiment, node: Any, meta: Any, data: Any,
                       state: Mapping[str, torch.Tensor]) -> Any:
    """Head-calibration sums of the global model's features on a node's training images.

    As ``evaluate_on_node``: in memory when the node holds every block, else streamed
    from its cache one block at a time.
    """
    from fedra_core.calibration import head_features, statistics

    device = node.device
    precision = experiment.training.precision if device != "cpu" else "fp32"
    if streams(node, meta):
        from fedra_core.streaming import StreamedGlobalModel, without_exits

        batch = min(experiment.training.eval_batch_size, experiment.training.batch_size)
        streamed = StreamedGlobalModel(node.backbone_cache, data.num_classes, experiment.backbone.lora, device,
                                       experiment.seed, method_for(experiment).global_layers(meta.num_layers), batch)
        features, labels = streamed.features(without_exits(state), data.train, precision=precision)
    else:
        model = global_model(experiment, node.backbone_cache, data.num_classes, device)
        model.load(state)
        features, labels = head_features(model.model, data.train, experiment.training.eval_batch_size, device,
                                          precision)
    return statistics(features, labels, data.num_classes)


def aggregate_evaluations(evaluations: Sequence[NodeEvaluation],
                          failures: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The round's client-side evaluation record.

    Per domain, the accuracy and loss weighted by each node's count (nodes of one domain
    share its test split, so this is that split's accuracy); ``mean_accuracy`` is the
    mean over domains, as the server-side evaluation reports it.

    Parameters
    ----------
    evaluations : Sequence[NodeEvaluation]
        The nodes' valid replies.
    failures : Sequence[Mapping[str, Any]]
        The nodes that failed, timed out or were rejected, with the reason.

    Returns
    -------
    dict
        ``accuracy`` and ``loss`` per domain, ``mean_accuracy``, ``weighted_accuracy``
        over all examples, ``nodes`` (one entry per node) and ``failures``.
    """
    by_domain: dict[str, list[NodeEvaluation]] = {}
    for evaluation in evaluations:
        by_domain.setdefault(evaluation.domain, []).append(evaluation)
    accuracy, loss, ensemble = {}, {}, {}
    for domain, nodes in sorted(by_domain.items()):
        counts = np.array([n.num_examples for n in nodes], dtype=float)
        accuracy[domain] = float(np.average([n.accuracy for n in nodes], weights=counts))
        loss[domain] = float(np.average([n.loss for n in nodes], weights=counts))
        if all(n.ensemble_accuracy is not None for n in nodes):
            ensemble[domain] = float(np.average([n.ensemble_accuracy for n in nodes], weights=counts))
    total = sum(n.num_examples for n in evaluations)
    record: dict[str, Any] = {
        "accuracy": accuracy, "loss": loss,
        "mean_accuracy": float(np.mean(list(accuracy.values()))) if accuracy else None,
        "weighted_accuracy": sum(n.accuracy * n.num_examples for n in evaluations) / total if total else None,
        "nodes": [{"node_id": n.node_id, "partition_id": n.partition_id, "domain": n.domain, "loss": n.loss,
                   "accuracy": n.accuracy, "num_examples": n.num_examples} for n in evaluations],
        "failures": [dict(f) for f in failures],
    }
    if ensemble:
        record["ensemble_accuracy"] = ensemble
        record["mean_ensemble_accuracy"] = float(np.mean(list(ensemble.values())))
    return record

