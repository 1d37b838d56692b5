"""The server's side of a run, framework-free: setup, per-round records, final output."""

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedra_core.backbone import CacheMeta, read_meta
from fedra_core.config import ConfigError, Experiment
from fedra_core.datasets import domain_names, test_sets
from fedra_core.federated import global_model, require_num_classes
from fedra_core.lora import State
from fedra_core.plots import plot_accuracy, plot_allocations
from fedra_core.pretrain import ensure_builtin_backbone
from fedra_core.records import CheckpointError, RecordsError, RunInUse, RunOutput, claim_run_dir

logger = logging.getLogger(__name__)


def prepare_backbone(experiment: Experiment) -> CacheMeta:
    """Read the backbone cache, building a builtin one first when it is missing."""
    cache = experiment.backbone.cache_path
    if experiment.backbone.builtin:
        return ensure_builtin_backbone(cache, experiment.backbone.builtin, seed=0)
    return read_meta(cache)


def check_experiment(experiment: Experiment, meta: CacheMeta) -> None:
    """Errors that need the backbone and the data: capacities against depth, client count."""
    for client, capacity in enumerate(experiment.clients.capacities):
        if not 1 <= capacity <= meta.num_layers:
            raise ConfigError(f"clients.capacities[{client}] = {capacity} is outside 1..{meta.num_layers} "
                              f"(the backbone {meta.timm_name} has {meta.num_layers} blocks)")
    data = experiment.data
    if not experiment.evaluation.on_server and data.dataset == "folder" and not data.domains \
            and not Path(str(data.root)).expanduser().is_dir():
        return  # the server holds no data: each node checks its own domains
    domains = domain_names(data)
    expected = len(domains) * experiment.data.clients_per_domain
    if expected != experiment.num_clients:
        raise ConfigError(f"clients.capacities has {experiment.num_clients} entries but the data has "
                          f"{len(domains)} domains x {experiment.data.clients_per_domain} clients per domain "
                          f"= {expected} clients")


def check_same_backbone(output: RunOutput, meta: CacheMeta) -> None:
    """Refuse to continue or read a run with other backbone weights than it was tuned on.

    Adapters only make sense on the weights they were trained with; a run records the
    cache's ``source`` (e.g. the builtin recipe's digest) in ``config.yaml``. Runs from
    before this was recorded are accepted.
    """
    recorded = output.read_extras().get("backbone_source")
    if recorded is not None and recorded != meta.source:
        raise ConfigError(f"{output.dir} was tuned on the backbone {recorded!r} but the cache now holds "
                          f"{meta.source!r}; point backbone.cache at the original weights")


def unique_run_dir(base: Path, name: str) -> Path:
    """Claim ``base/name``, or ``base/name-2``, ``-3``...: created here, so no other run shares it."""
    return claim_run_dir(base, name)


class ServerRun:
    """Everything the server does around the strategy: setup, evaluation, records, output."""

    def __init__(self, experiment: Experiment, run_dir: Path, resume: bool = False) -> None:
        self.experiment = experiment
        if resume and not (Path(run_dir) / "config.yaml").is_file():
            raise ConfigError(f"resume: {run_dir} holds no run to resume")
        self.output = RunOutput(run_dir)
        try:
            self.output.lock()  # held until this process ends: no second run or resume writes here
        except RunInUse as err:
            raise ConfigError(str(err)) from None
        try:
            self._setup(resume)
        except BaseException:
            self.output.unlock()
            if not resume and not self.output.rounds_path.exists():
                shutil.rmtree(self.output.dir, ignore_errors=True)  # a run that never started leaves no folder
            raise

    def _setup(self, resume: bool) -> None:
        experiment = self.experiment
        self.meta = prepare_backbone(experiment)
        check_experiment(experiment, self.meta)
        if experiment.evaluation.on_server:
            self.test_sets, self.num_classes = test_sets(experiment, self.meta)
        else:  # the nodes evaluate on their own data: the server needs none
            self.test_sets, self.num_classes = {}, require_num_classes(experiment)
        device = experiment.training.device
        if device != "cpu" and not torch.cuda.is_available():
            logger.info("the server has no CUDA: the global model is evaluated on the CPU")
            device = "cpu"
        self.model = global_model(experiment, experiment.backbone.cache_path, self.num_classes, device)
        self.start_round = 0
        self.rng = np.random.default_rng(experiment.seed)
        self.state = self.model.initial_state()
        self.server_state: State = {}  # the strategy's own state across rounds (checkpointed)
        if resume:
            self._resume()
        else:
            self.output.write_config(experiment, {"backbone": self.meta.timm_name, "num_layers": self.meta.num_layers,
                                                  "backbone_source": self.meta.source})
        self.started = time.perf_counter()
        self._round_started = time.perf_counter()

    def _resume(self) -> None:
        try:
            checkpoint = self.output.load_checkpoint()
            self.output.read_rounds()  # a bad line other than a torn last one is reported now
        except (CheckpointError, RecordsError) as err:
            raise ConfigError(f"resume: {err}") from None
        if set(checkpoint.state) != set(self.state):
            raise ConfigError(f"resume: the checkpoint in {self.output.dir} does not fit this experiment's model")
        check_same_backbone(self.output, self.meta)
        self.state, self.start_round, self.rng = checkpoint.state, checkpoint.round, checkpoint.rng
        self.server_state = checkpoint.server_state
        self.output.truncate_rounds(checkpoint.round)
        logger.info("resuming %s after round %d", self.output.dir, checkpoint.round)

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def remaining_rounds(self) -> int:
        return self.experiment.training.rounds - self.start_round

    def end_round(self, server_round: int, state: Mapping[str, torch.Tensor],
                  train_record: Mapping[str, Any] | None, server_state: State | None = None,
                  client_eval: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Evaluate the global model, write the round's record and the checkpoint.

        ``server_state`` is what the strategy keeps across rounds (InclusiveFL's
        momentum): it goes into the same checkpoint, so a resumed run goes on exactly.
        ``client_eval`` is the nodes' evaluation of this round (``evaluation.mode``
        ``clients`` or ``both``); with ``clients`` it is the round's accuracy.
        """
        evaluation = self.experiment.evaluation
        record: dict[str, Any] = {"round": server_round, **(train_record or {})}
        eval_start = time.perf_counter()
        if evaluation.on_server and evaluation.due(server_round, self.experiment.training.rounds):
            results = self.model.evaluate(state, self.test_sets, self.experiment.training.eval_batch_size)
            accuracy = {name: r["accuracy"] for name, r in results.items()}
            record.update({"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
                           "loss": {name: r["loss"] for name, r in results.items()}, **ensemble_record(results),
                           "evaluated_by": "server"})
        if client_eval is not None:
            record["client_eval"] = dict(client_eval)
            if not evaluation.on_server and client_eval.get("accuracy"):
                record.update({k: client_eval[k] for k in ("accuracy", "mean_accuracy", "loss",
                                                           "ensemble_accuracy", "mean_ensemble_accuracy")
                               if k in client_eval})
                record["evaluated_by"] = "clients"
        record.update({
            "eval_seconds": time.perf_counter() - eval_start,
            "round_seconds": time.perf_counter() - self._round_started,
            "elapsed_seconds": time.perf_counter() - self.started,
        })
        self.output.append_round(record)
        if server_round > 0:
            self.state = {k: v.detach().clone() for k, v in state.items()}
            self.server_state = {k: v.detach().clone() for k, v in (server_state or {}).items()}
            self.output.save_checkpoint(self.state, server_round, self.rng, server_state=self.server_state)
        self._round_started = time.perf_counter()
        return record

    def finish(self) -> str:
        """Write the final adapters and plots; return the results table as Markdown."""
        records = self.output.read_rounds()
        self.output.save_adapters(self.state, {"backbone": self.meta.timm_name, "method":
                                               self.experiment.strategy.method,
                                               "rounds": str(records[-1]["round"] if records else 0)})
        plot_accuracy(records, self.output.dir / "accuracy.png", title=self.experiment.name)
        plot_allocations(records, self.output.dir / "allocation.png")
        table = results_table(records)
        (self.output.dir / "results.md").write_text(table + "\n")
        return table


def results_table(records: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy per domain and mean, before tuning and after the last round."""
    evaluated = [r for r in records if r.get("accuracy")]
    if not evaluated:
        return "(no evaluated round)"
    domains = list(dict.fromkeys(d for r in evaluated for d in r["accuracy"]))
    header = "| | " + " | ".join(domains) + " | mean |\n|---|" + "---|" * (len(domains) + 1)
    lines = [header]
    for record in (evaluated[0], evaluated[-1]):
        label = "untuned (round 0)" if record["round"] == 0 else f"round {record['round']}"
        cells = " | ".join(f"{100 * record['accuracy'][d]:.1f}" if d in record["accuracy"] else "–" for d in domains)
        lines.append(f"| {label} | {cells} | **{100 * record['mean_accuracy']:.1f}** |")
        if record.get("ensemble_accuracy"):
            ensemble = record["ensemble_accuracy"]
            cells = " | ".join(f"{100 * ensemble[d]:.1f}" if d in ensemble else "–" for d in domains)
            lines.append(f"| {label}, ensemble | {cells} | **{100 * record['mean_ensemble_accuracy']:.1f}** |")
    return "\n".join(lines)


def ensemble_record(results: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``ensemble_accuracy`` per domain and its mean, for a method scored by several classifiers."""
    ensemble = {name: r["ensemble_accuracy"] for name, r in results.items() if "ensemble_accuracy" in r}
    if not ensemble:
        return {}
    return {"ensemble_accuracy": ensemble, "mean_ensemble_accuracy": float(np.mean(list(ensemble.values())))}


def describe_state(state: State) -> str:
    """Tensors and bytes of a state, for logs."""
    return f"{len(state)} tensors, {sum(v.numel() * v.element_size() for v in state.values()) / 1e6:.2f} MB"
