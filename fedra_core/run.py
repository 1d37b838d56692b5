"""The server's side of a run, framework-free: setup, per-round records, final output."""

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from fedra_core.backbone import CacheMeta, read_meta
from fedra_core.config import ConfigError, Experiment
from fedra_core.crossdistill import CrossDistiller
from fedra_core.datasets import domain_names, proxy_sets, test_sets
from fedra_core.federated import global_model, require_num_classes
from fedra_core.lora import State
from fedra_core.methods import method_for
from fedra_core.plots import plot_accuracy, plot_allocations, plot_architectures
from fedra_core.pretrain import ensure_builtin_backbone
from fedra_core.records import CheckpointError, RecordsError, RunInUse, RunOutput, claim_run_dir

logger = logging.getLogger(__name__)


def prepare_backbone(experiment: Experiment) -> CacheMeta:
    """Read the backbone cache, building a builtin one first when it is missing."""
    cache = experiment.backbone.cache_path
    if experiment.backbone.builtin:
        return ensure_builtin_backbone(cache, experiment.backbone.builtin, seed=0)
    return read_meta(cache)


def prepare_backbones(experiment: Experiment) -> dict[str | None, CacheMeta]:
    """Every backbone the run's global models use: ``{None: meta}``, or one per architecture (HeteroTune)."""
    names = method_for(experiment).architectures()
    if not names:
        return {None: prepare_backbone(experiment)}
    metas: dict[str | None, CacheMeta] = {}
    for name in names:
        arch = experiment.backbone.architecture(name)
        metas[name] = ensure_builtin_backbone(arch.cache_path, arch.builtin, seed=0) if arch.builtin \
            else read_meta(arch.cache_path)
    sources = [m.source for m in metas.values() if m.source]
    if len(set(sources)) != len(sources):
        raise ConfigError(f"backbone.architectures: two caches hold the same weights ({sources}); "
                          "each architecture needs its own backbone")
    return metas


def cache_of(experiment: Experiment, architecture: str | None) -> Path:
    """The cache of an architecture, or the experiment's one backbone."""
    if architecture is None:
        return experiment.backbone.cache_path
    return experiment.backbone.architecture(architecture).cache_path


def check_experiment(experiment: Experiment, meta: CacheMeta | Mapping[str | None, CacheMeta]) -> None:
    """Errors that need the backbone and the data: capacities against depth, client count."""
    metas = meta if isinstance(meta, Mapping) else {None: meta}
    method = method_for(experiment)
    for client, capacity in enumerate(experiment.clients.capacities):
        architecture = method.architecture_of(client)
        own = metas.get(architecture)
        if own is None:
            continue  # hetero-largest: every client runs the largest, its capacity is not used
        where = f"the backbone {own.timm_name}" + (f" of architecture {architecture!r}" if architecture else "")
        if not 1 <= capacity <= own.num_layers:
            raise ConfigError(f"clients.capacities[{client}] = {capacity} is outside 1..{own.num_layers} "
                              f"({where} has {own.num_layers} blocks)")
    if method.heterogeneous:
        depths = {name: m.num_layers for name, m in metas.items()}
        slots = experiment.backbone.adapter.slots
        if slots > min(depths.values()):
            raise ConfigError(f"backbone.adapter.slots = {slots} exceeds the depth of an architecture {depths}")
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


def check_same_backbone(output: RunOutput, meta: CacheMeta | Mapping[str | None, CacheMeta]) -> None:
    """Refuse to continue or read a run with other backbone weights than it was tuned on.

    Adapters only make sense on the weights they were trained with; a run records the
    cache's ``source`` (e.g. the builtin recipe's digest) in ``config.yaml``, one per
    architecture for HeteroTune. Runs from before this was recorded are accepted.
    """
    metas = meta if isinstance(meta, Mapping) else {None: meta}
    extras = output.read_extras()
    recorded = {None: extras["backbone_source"]} if "backbone_source" in extras else \
        dict(extras.get("backbone_sources") or {})
    for name, own in metas.items():
        if name in recorded and recorded[name] != own.source:
            which = f"architecture {name!r}'s backbone" if name else "the backbone"
            raise ConfigError(f"{output.dir} was tuned on {which} {recorded[name]!r} but the cache now holds "
                              f"{own.source!r}; point the cache at the original weights")


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
        self.method = method_for(experiment)
        self.metas = prepare_backbones(experiment)  # {None: the backbone}, or one per architecture
        self.meta = next(iter(self.metas.values()))
        check_experiment(experiment, self.metas)
        self.prepared = self._prepare_method()  # e.g. FedRA's block surrogates, distilled once per cache
        self.test_sets_of: dict[str | None, dict[str, Any]] = {}
        if experiment.evaluation.on_server:
            loaded = self._per_input(lambda meta: test_sets(experiment, meta))  # (sets, number of classes)
            self.test_sets_of = {name: sets for name, (sets, _) in loaded.items()}
            self.num_classes = next(iter(loaded.values()))[1]
        else:  # the nodes evaluate on their own data: the server needs none
            self.test_sets_of, self.num_classes = {name: {} for name in self.metas}, require_num_classes(experiment)
        self.test_sets = next(iter(self.test_sets_of.values()))
        device = experiment.training.device
        if device != "cpu" and not torch.cuda.is_available():
            logger.info("the server has no CUDA: the global model is evaluated on the CPU")
            device = "cpu"
        self.models = {name: global_model(experiment, cache_of(experiment, name), self.num_classes, device, name)
                       for name in self.metas}
        self.model = next(iter(self.models.values()))
        self.refine = self._distiller()  # HeteroTune's cross-architecture distillation, or None
        self.start_round = 0
        self.rng = np.random.default_rng(experiment.seed)
        self.state = {}
        for model in self.models.values():  # the shared parts start alike in every architecture
            self.state.update(model.initial_state())
        self.server_state: State = {}  # the strategy's own state across rounds (checkpointed)
        if resume:
            self._resume()
        else:
            self.output.write_config(experiment, self._backbone_extras())
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
        check_same_backbone(self.output, self.metas)
        self.state, self.start_round, self.rng = checkpoint.state, checkpoint.round, checkpoint.rng
        self.server_state = checkpoint.server_state
        self.output.truncate_rounds(checkpoint.round)
        logger.info("resuming %s after round %d", self.output.dir, checkpoint.round)

    def _per_input(self, load: Callable[[CacheMeta], Any]) -> dict[str | None, Any]:
        """``load(meta)`` for every architecture, once per way of reading images (size, mean, std)."""
        by_input: dict[tuple, Any] = {}
        for meta in self.metas.values():
            key = (meta.image_size, tuple(meta.mean), tuple(meta.std))
            if key not in by_input:
                by_input[key] = load(meta)
        return {name: by_input[(m.image_size, tuple(m.mean), tuple(m.std))] for name, m in self.metas.items()}

    def _distiller(self) -> CrossDistiller | None:
        """The server's distillation step between architectures when ``strategy.distill_steps`` asks for one."""
        experiment = self.experiment
        if not (self.method.cross_distill and experiment.strategy.distill_steps > 0):
            return None
        proxy = {name: ConcatDataset(list(sets.values()))
                 for name, sets in self._per_input(lambda meta: proxy_sets(experiment, meta)).items()}
        try:
            return CrossDistiller(self.models, self.method, {n: m.num_layers for n, m in self.metas.items()},
                                  proxy, experiment.strategy, experiment.seed, experiment.training.eval_batch_size,
                                  capacities={n: float(self.models[n].model.num_features) * m.num_layers
                                              for n, m in self.metas.items()})
        except ValueError as err:
            raise ConfigError(f"strategy.distill_steps: {err}") from err

    def _prepare_method(self) -> dict[str, Any]:
        """The method's server-side work before the first round, with a ``ConfigError`` when it cannot be done."""
        if None not in self.metas:
            return {}
        try:
            return self.method.prepare(self.experiment.backbone.cache_path)
        except (RuntimeError, ValueError, OSError) as err:
            raise ConfigError(f"strategy.method {self.experiment.strategy.method!r}: {err}") from err

    def _backbone_extras(self) -> dict[str, Any]:
        if None in self.metas:
            return {"backbone": self.meta.timm_name, "num_layers": self.meta.num_layers,
                    "backbone_source": self.meta.source, **self.prepared}
        return {"backbone": ", ".join(f"{n}: {m.timm_name}" for n, m in self.metas.items()),
                "architectures": {n: {"timm_name": m.timm_name, "num_layers": m.num_layers, "source": m.source,
                                      "embed_dim": m.kwargs.get("embed_dim")} for n, m in self.metas.items()},
                "backbone_sources": {n: m.source for n, m in self.metas.items()}}

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    @property
    def architectures(self) -> dict[str, tuple[str, int]]:
        """Each architecture's (cache source, depth); empty for one backbone."""
        return {n: (m.source, m.num_layers) for n, m in self.metas.items() if n is not None}

    @property
    def remaining_rounds(self) -> int:
        return self.experiment.training.rounds - self.start_round

    def _evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The server's evaluation of the global model(s) on every domain's test set.

        With several architectures, each one's global model is evaluated on every
        domain (``architectures``); ``accuracy`` is then each domain's mean over the
        architectures and ``mean_accuracy`` the mean of that.
        """
        batch = self.experiment.training.eval_batch_size
        if None in self.models:
            results = self.model.evaluate(state, self.test_sets, batch)
            accuracy = {name: r["accuracy"] for name, r in results.items()}
            return {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
                    "loss": {name: r["loss"] for name, r in results.items()}, **ensemble_record(results),
                    "evaluated_by": "server"}
        per_architecture = {}
        for name, model in self.models.items():
            depth = self.metas[name].num_layers
            own = self.method.sendable(state, range(depth), name, depth)
            results = model.evaluate(own, self.test_sets_of[name], batch)
            accuracy = {domain: r["accuracy"] for domain, r in results.items()}
            per_architecture[name] = {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
                                      "loss": {domain: r["loss"] for domain, r in results.items()}}
        domains = list(next(iter(per_architecture.values()))["accuracy"])
        accuracy = {d: float(np.mean([a["accuracy"][d] for a in per_architecture.values()])) for d in domains}
        return {"accuracy": accuracy, "mean_accuracy": float(np.mean(list(accuracy.values()))),
                "architectures": per_architecture, "evaluated_by": "server"}

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
            record.update(self._evaluate(state))
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
        self.output.save_adapters(self.state, {"backbone": self._backbone_extras()["backbone"], "method":
                                               self.experiment.strategy.method,
                                               "rounds": str(records[-1]["round"] if records else 0)})
        plot_accuracy(records, self.output.dir / "accuracy.png", title=self.experiment.name)
        plot_allocations(records, self.output.dir / "allocation.png")
        if None not in self.metas:
            plot_architectures(records, self.output.dir / "architectures.png", title=self.experiment.name)
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
        for arch, result in (record.get("architectures") or {}).items():
            cells = " | ".join(f"{100 * result['accuracy'][d]:.1f}" if d in result["accuracy"] else "–"
                               for d in domains)
            lines.append(f"| {label}, {arch} | {cells} | **{100 * result['mean_accuracy']:.1f}** |")
    traffic = architecture_traffic(records)
    if traffic:
        lines += ["", "| architecture | clients per round | bytes sent per client per round | bytes received |",
                  "|---|---|---|---|"]
        lines += [f"| {arch} | {t['clients']:.1f} | {t['sent']:,.0f} | {t['received']:,.0f} |"
                  for arch, t in traffic.items()]
    return "\n".join(lines)


def architecture_traffic(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per architecture: clients per round, mean bytes sent to and received from a client per round."""
    rows: dict[str, list[dict[str, Any]]] = {}
    rounds = [r for r in records if r.get("clients")]
    for record in rounds:
        for client in record["clients"]:
            if client.get("architecture") and client.get("status") == "ok":
                rows.setdefault(client["architecture"], []).append(client)
    return {arch: {"clients": len(clients) / len(rounds),
                   "sent": float(np.mean([c["bytes_sent"] for c in clients])),
                   "received": float(np.mean([c["bytes_received"] for c in clients]))}
            for arch, clients in sorted(rows.items())}


def ensemble_record(results: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``ensemble_accuracy`` per domain and its mean, for a method scored by several classifiers."""
    ensemble = {name: r["ensemble_accuracy"] for name, r in results.items() if "ensemble_accuracy" in r}
    if not ensemble:
        return {}
    return {"ensemble_accuracy": ensemble, "mean_ensemble_accuracy": float(np.mean(list(ensemble.values())))}


def describe_state(state: State) -> str:
    """Tensors and bytes of a state, for logs."""
    return f"{len(state)} tensors, {sum(v.numel() * v.element_size() for v in state.values()) / 1e6:.2f} MB"
