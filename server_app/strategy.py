"""The FedRA Strategy: random block allocation, per-block masked averaging."""

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedra_core.aggregation import InvalidReply, clip_delta, is_finite_state
from fedra_core.allocation import layers_of
from fedra_core.calibration import CalibrationError, calibrate_state, head_keys
from fedra_core.config import Experiment
from fedra_core.federated import NodeEvaluation, aggregate_evaluations
from fedra_core.lora import State
from fedra_core.methods import method_for
from fedra_core.wire import encode
from server_app.replies import (
    read_calibration_reply,
    read_capacity,
    read_eval_reply,
    read_train_reply,
    serialized_bytes,
)

QUERY_TIMEOUT = 120.0
QUERY_BACKOFF = (60.0, 3600.0)  # a silent node is asked again after 60 s, doubling up to an hour
CALIBRATE = f"{MessageType.EVALUATE}.calibrate"  # the ClientApp's handler of head-calibration requests
TRAINING_HEAD = "calibration.training_head."  # checkpoint prefix of the head the clients train (head calibration)


class FederationTooSmall(RuntimeError):
    """Fewer nodes exist than the experiment has clients."""


@dataclass(frozen=True)
class NodeInfo:
    """What a node declared when asked before its first round."""

    node_id: int
    partition_id: int
    max_layers: int
    domain: str
    num_examples: int
    architecture: str | None = None  # HeteroTune: the backbone the node's cache holds
    depth: int = 0  # blocks of that backbone


@dataclass
class PendingEvaluation:
    """What was sent for the nodes' evaluation of a round."""

    server_round: int
    nodes: list[NodeInfo]
    messages: list[Message]
    bytes_sent: int
    started: float = field(default_factory=time.perf_counter)


@dataclass
class PendingRound:
    """What was sent in a round, to check and aggregate the replies against."""

    server_round: int
    state: State
    nodes: list[NodeInfo]
    matrix: np.ndarray
    sent: dict[int, State] = field(default_factory=dict)  # node id -> sliced state
    shown_head: State = field(default_factory=dict)  # the calibrated head ``state``'s training head replaced
    messages: list[Message] = field(default_factory=list)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def node_of(self, reply: Message) -> int:
        """The node a reply answers, also for errors the SuperLink sends on its behalf."""
        return node_of_reply(reply, self.messages)


def node_of_reply(reply: Message, sent: list[Message]) -> int:
    """Map a reply to the node its request went to (a dead node's error comes from the SuperLink)."""
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def _sendable(arrays: ArrayRecord) -> State:
    """The global state to send; a state with NaN or infinite values is never sent."""
    state = dict(arrays.to_torch_state_dict())
    if not is_finite_state(state):
        raise RuntimeError("the global state holds NaN or infinite values; refusing to send it")
    return state


def to_record(state: State, wire_dtype: str) -> ArrayRecord:
    """An ArrayRecord carrying ``state`` in the wire dtype."""
    return ArrayRecord({k: Array(v) for k, v in encode(state, wire_dtype).items()})


class FedRA(Strategy):
    """FedRA (Su et al., ECCV 2024) for heterogeneous clients, on Flower's Message API.

    Each round it samples clients, draws an allocation matrix from their declared
    capacities, sends every client only the global state of its blocks plus the
    shared parts, checks each reply and averages every tensor over the clients that
    trained it.

    Parameters
    ----------
    experiment : Experiment
        The resolved experiment (method, sampling, weighting, training settings).
    num_layers : int
        Depth of the backbone.
    rng : numpy.random.Generator
        The run's only source of randomness on the server (sampling and allocation).
    round_offset : int
        Rounds already done before this start (resuming).
    backbone_source : str
        The ``source`` of the server's backbone cache; a node whose cache records
        another one (other weights) is excluded with the reason.
    simulation : bool
        Whether the nodes are Flower's simulated SuperNodes, whose ``num-partitions``
        is the federation's true size; a deployed node's claim is never trusted to
        stop the run.
    architectures : Mapping[str, tuple[str, int]], optional
        HeteroTune: each architecture's cache source and depth. A node's architecture
        is the one whose source its cache declares; a node whose cache is none of
        them is excluded with the reason.
    refine : callable, optional
        The server's step after averaging, ``(state, round) -> (state, info)``
        (HeteroTune's cross-architecture distillation); ``info`` goes into the
        round's record as ``distill``.
    """

    def __init__(self, experiment: Experiment, num_layers: int, rng: np.random.Generator,
                 round_offset: int = 0, backbone_source: str = "", simulation: bool = False,
                 architectures: Mapping[str, tuple[str, int]] | None = None,
                 refine: Callable[[State, int], tuple[State, dict[str, Any]]] | None = None) -> None:
        self.experiment = experiment
        self.refine = refine
        self.architectures = dict(architectures or {})
        self.backbone_source = backbone_source
        self.simulation = simulation
        self.cfg = experiment.strategy
        self.num_layers = num_layers
        self.rng = rng
        self.round_offset = round_offset
        self.nodes: dict[int, NodeInfo] = {}
        self.excluded: dict[int, str] = {}
        self.silent: dict[int, tuple[int, float]] = {}  # node -> (unanswered queries, next try)
        self.pending: PendingRound | None = None
        self.pending_eval: PendingEvaluation | None = None
        self.last_eval: dict[str, Any] | None = None  # the nodes' evaluation of the last round
        self.last_record: dict[str, Any] = {}
        self.method = method_for(experiment)  # allocation, slicing, aggregation; its memory across rounds
        self.grid: Grid | None = None  # the run's grid, for head calibration inside a round
        # After a calibration the global state carries the calibrated head (evaluated, saved); the
        # clients go on training the averaged one, kept here (checkpointed by ``server_state``).
        self.training_head: State = {}
        self._experiment_json = experiment.to_json()

    def server_state(self) -> State:
        """What the method keeps across rounds (InclusiveFL's momentum) and the training head, for the checkpoint."""
        state = {self.method.memory_prefix + key: value for key, value in self.method.memory.items()}
        return {**state, **{TRAINING_HEAD + key: value for key, value in self.training_head.items()}}

    def load_server_state(self, state: State) -> None:
        """Continue from a checkpoint's ``server_state``."""
        head = {key[len(TRAINING_HEAD):]: value for key, value in state.items() if key.startswith(TRAINING_HEAD)}
        if head and not self.cfg.head_calibration:
            raise ValueError("the checkpoint holds the training head of a run with head calibration; "
                             "resume it with strategy.head_calibration set")
        self.training_head = head
        state = {key: value for key, value in state.items() if not key.startswith(TRAINING_HEAD)}
        prefix = self.method.memory_prefix
        unknown = [k for k in state if not prefix or not k.startswith(prefix)]
        if unknown:
            raise ValueError(f"the checkpoint holds server state this strategy does not keep: {unknown[:3]}")
        self.method.load_memory({key[len(prefix):]: value for key, value in state.items()})

    def summary(self) -> None:
        """Log the strategy's settings as a small tree."""
        cfg = self.cfg
        log(INFO, "\t├──> Allocation: %s over %d blocks", cfg.method, self.num_layers)
        log(INFO, "\t├──> Sampling: %s per round%s, at least %d",
            cfg.clients_per_round or "all", " (one per domain)" if cfg.one_per_domain else "",
            cfg.min_clients)
        log(INFO, "\t├──> Aggregation: masked mean per tensor, %s weights", cfg.weighting)
        log(INFO, "\t└──> Clients known: %d", len(self.nodes))

    # ---------------------------------------------------------------- nodes
    def discover(self, grid: Grid, wait_for: int = 0, wait_timeout: float = 300.0) -> None:
        """Ask every node not yet known for its capacity; wait for ``wait_for`` valid nodes.

        A node that did not answer is asked again only after a back-off that doubles
        with every unanswered query, so a silent node does not stall every round.
        """
        deadline = time.monotonic() + wait_timeout
        while True:
            now = time.monotonic()
            fresh = [n for n in grid.get_node_ids() if n not in self.nodes and n not in self.excluded
                     and self.silent.get(n, (0, 0.0))[1] <= now]
            if fresh:
                self._query(grid, fresh, first=wait_for > 0)
            if len(self.nodes) >= wait_for or time.monotonic() > deadline:
                return
            if self.simulation and all(n in self.nodes or n in self.excluded for n in grid.get_node_ids()):
                return  # every simulated node has answered: none is still starting
            log(INFO, "Waiting for clients: %d of %d have declared their capacity", len(self.nodes), wait_for)
            time.sleep(1.0)

    def _query(self, grid: Grid, node_ids: list[int], first: bool = False) -> None:
        content = RecordDict({"config": ConfigRecord({"experiment": self._experiment_json})})
        messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
        replies = grid.send_and_receive(messages, timeout=min(QUERY_TIMEOUT, self.cfg.reply_timeout))
        answered = set()
        for reply in replies:
            node_id = node_of_reply(reply, messages)
            if node_id not in node_ids or node_id in answered:
                continue
            answered.add(node_id)
            self.silent.pop(node_id, None)
            try:
                self.nodes[node_id] = self._node_info(node_id, reply, first)
                info = self.nodes[node_id]
                log(INFO, "Client %d: partition %d (%s), holds up to %d blocks, %d examples",
                    node_id, info.partition_id, info.domain, info.max_layers, info.num_examples)
            except InvalidReply as err:
                self.excluded[node_id] = err.reason
                log(WARNING, "Client %d excluded: %s", node_id, err.reason)
        for node_id in set(node_ids) - answered:
            tries = self.silent.get(node_id, (0, 0.0))[0] + 1
            wait = min(QUERY_BACKOFF[0] * 2 ** (tries - 1), QUERY_BACKOFF[1])
            self.silent[node_id] = (tries, time.monotonic() + wait)
            log(WARNING, "Client %d did not answer the capacity query (%d times); asking again in %.0f s",
                node_id, tries, wait)

    def _node_info(self, node_id: int, reply: Message, first: bool = False) -> NodeInfo:
        declared = read_capacity(reply, self.experiment.num_clients)
        self._check_federation_size(declared, first)
        if self.method.heterogeneous:
            return self._hetero_node_info(node_id, declared)
        if declared.backbone_layers is not None and declared.backbone_layers != self.num_layers:
            raise InvalidReply(f"its backbone cache has {declared.backbone_layers} blocks, "
                               f"the server's {self.num_layers}")
        source = declared.backbone_source
        if source and self.backbone_source and source != self.backbone_source:
            raise InvalidReply(f"its backbone cache holds other weights ({source}) than the server's "
                               f"({self.backbone_source}); give the node a copy of the server's cache")
        return NodeInfo(node_id, declared.partition_id, min(declared.max_layers, self.num_layers),
                        declared.domain, declared.num_examples, depth=self.num_layers)

    def _check_federation_size(self, declared: Any, first: bool) -> None:
        partitions = declared.num_partitions
        if self.simulation and first and partitions is not None and partitions < self.experiment.num_clients:
            raise FederationTooSmall(
                f"the federation has {partitions} partitions (simulated SuperNodes) but the experiment has "
                f"{self.experiment.num_clients} clients (clients.capacities); run with "
                f"--federation-config 'num-supernodes={self.experiment.num_clients}' (deploy/simulate.py does)")

    def _hetero_node_info(self, node_id: int, declared: Any) -> NodeInfo:
        """A node of a heterogeneous federation: its architecture is the one whose weights its cache holds."""
        source = declared.backbone_source
        known = {src: name for name, (src, _) in self.architectures.items()}
        if not source or source not in known:
            listed = ", ".join(f"{name}: {src}" for name, (src, _) in self.architectures.items())
            raise InvalidReply(f"its backbone cache holds {source or 'weights of no recorded source'}, none of the "
                               f"experiment's architectures ({listed}); give the node a copy of one of their caches")
        architecture = known[source]
        depth = self.architectures[architecture][1]
        if declared.backbone_layers is not None and declared.backbone_layers != depth:
            raise InvalidReply(f"its backbone cache has {declared.backbone_layers} blocks, architecture "
                               f"{architecture!r} has {depth}")
        return NodeInfo(node_id, declared.partition_id, min(declared.max_layers, depth), declared.domain,
                        declared.num_examples, architecture, depth)

    def _sample(self, grid: Grid) -> list[NodeInfo]:
        connected = set(grid.get_node_ids())
        pool = sorted((n for n in self.nodes.values() if n.node_id in connected), key=lambda n: n.partition_id)
        if self.cfg.one_per_domain:
            domains = sorted({n.domain for n in pool})
            chosen = [self.rng.choice([n for n in pool if n.domain == d]) for d in domains]
        elif self.cfg.clients_per_round and self.cfg.clients_per_round < len(pool):
            picks = self.rng.choice(len(pool), size=self.cfg.clients_per_round, replace=False)
            chosen = [pool[i] for i in sorted(picks)]
        else:
            chosen = pool
        if len(chosen) < self.cfg.min_clients:
            raise RuntimeError(f"only {len(chosen)} clients are available, fewer than "
                               f"strategy.min_clients = {self.cfg.min_clients}; stopping the run")
        return sorted(chosen, key=lambda n: n.partition_id)

    # ---------------------------------------------------------------- train
    def allocation(self, nodes: list[NodeInfo]) -> np.ndarray:
        """The round's allocation matrix, one row per sampled node (partition order)."""
        return self.method.allocate([n.max_layers for n in nodes], [n.depth or self.num_layers for n in nodes],
                                    self.rng)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample, allocate, and send each node the state of its blocks and the shared parts."""
        self.grid = grid
        self.discover(grid)
        nodes = self._sample(grid)
        matrix = self.allocation(nodes)
        state = _sendable(arrays)
        shown = {key: state[key] for key in self.training_head if key in state}
        state = {**state, **self.training_head}  # after a calibration: the clients train the averaged head
        pending = PendingRound(self.round_offset + server_round, state, nodes, matrix, shown_head=shown)
        for row, node in enumerate(nodes):
            layers = layers_of(matrix, row)
            pending.sent[node.node_id] = self.method.sendable(state, layers, node.architecture, node.depth)
            extras = self.method.extras(layers, node.depth or self.num_layers)  # surrogates
            record = to_record({**pending.sent[node.node_id], **extras}, self.cfg.wire_dtype)
            if self.method.returns_extras:  # tuned surrogates: their deltas come back with the adapters'
                pending.sent[node.node_id] = {**pending.sent[node.node_id], **extras}
            pending.bytes_sent[node.node_id] = serialized_bytes(record)
            cfg = ConfigRecord({**config, "server-round": pending.server_round, "layers": layers,
                                "wire-dtype": self.cfg.wire_dtype, "experiment": self._experiment_json,
                                **({"architecture": node.architecture} if node.architecture else {})})
            content = RecordDict({"arrays": record, "config": cfg})
            pending.messages.append(Message(content=content, message_type=MessageType.TRAIN,
                                            dst_node_id=node.node_id))
        self.pending = pending
        log(INFO, "configure_train: %d clients, blocks held %s", len(nodes), matrix.sum(axis=1).tolist())
        return pending.messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, then average each tensor over the clients that trained it."""
        pending = self.pending
        if pending is None:
            raise RuntimeError("aggregate_train called before configure_train")
        outcomes = {n.node_id: {"status": "failed", "reason": "no reply within the timeout"} for n in pending.nodes}
        deltas: dict[int, State] = {}
        for reply in replies:
            node_id = pending.node_of(reply)
            if node_id not in pending.sent or node_id in deltas:
                log(WARNING, "Ignoring a reply from node %s that was not sent a task or already answered", node_id)
                continue
            outcomes[node_id], delta = self._check_reply(reply, pending.sent[node_id], self.nodes[node_id])
            if delta is not None:
                deltas[node_id] = delta
        self.last_record = self._round_record(pending, outcomes)
        unchanged = ArrayRecord({**pending.state, **pending.shown_head})  # as the round found it
        if not deltas:
            log(WARNING, "Round %d: no valid reply; the global state is unchanged", pending.server_round)
            return unchanged, None
        new_state = self._aggregate(pending, deltas, outcomes)
        if not is_finite_state(new_state):
            # Finite deltas can still overflow float32 when added: keep the last good state.
            reason = "the averaged state overflowed to NaN or infinity; the round was discarded"
            log(WARNING, "Round %d: %s", pending.server_round, reason)
            self.last_record["aggregation"] = {"status": "discarded", "reason": reason}
            return unchanged, None
        self.training_head = {}
        if self.cfg.calibration_due(pending.server_round, self.experiment.training.rounds):
            self.training_head = {key: new_state[key] for key in head_keys(new_state)}
            new_state = self.calibrate(new_state, pending.server_round)
        return ArrayRecord(new_state), self._train_metrics(outcomes)

    def _aggregate(self, pending: PendingRound, deltas: dict[int, State],
                   outcomes: dict[int, dict[str, Any]]) -> State:
        """The masked average of the accepted deltas, then the method's server-side step."""
        weights = [float(outcomes[n]["weight"]) for n in deltas]
        use = None if self.cfg.weighting == "uniform" else weights
        architectures = [self.nodes[n].architecture for n in deltas]
        state, info = self.method.aggregate(pending.state, list(deltas.values()), use, architectures)
        if info:
            self.last_record["aggregation"] = info
        if self.refine is not None and is_finite_state(state):
            state, done = self.refine(state, pending.server_round)
            self.last_record["distill"] = done
            agreement = ", ".join(f"{name} {a['before']['agreement']:.2f}->{a['after']['agreement']:.2f}"
                                  for name, a in done.get("architectures", {}).items())
            log(INFO, "Round %d: distilled across architectures in %.1fs (agreement with their ensemble: %s)",
                pending.server_round, done.get("seconds", 0.0), agreement)
        return state

    def _max_examples(self, node: NodeInfo) -> int:
        """Most examples a node can see in a round: steps x batch, or epochs over its declared data."""
        training = self.experiment.training
        if training.local_steps is not None:
            return training.local_steps * training.batch_size
        return training.local_epochs * node.num_examples

    def _check_reply(self, reply: Message, sent: State, node: NodeInfo) -> tuple[dict[str, Any], State | None]:
        if reply.has_error():
            log(WARNING, "Client %d failed: %s", node.node_id, reply.error.reason)
            return {"status": "failed", "reason": reply.error.reason}, None
        try:
            checked = read_train_reply(reply, sent, self.cfg.wire_dtype, self._max_examples(node))
        except InvalidReply as err:
            log(WARNING, "Rejected the reply of client %d: %s", node.node_id, err.reason)
            return {"status": "rejected", "reason": err.reason}, None
        delta, norm = clip_delta(checked.delta, self.cfg.clip_delta_norm)
        outcome: dict[str, Any] = {
            "status": "ok", "num_examples": checked.examples_seen,
            # num-examples weighting counts the node's dataset (declared once, checked), not
            # the examples seen this round, which local_steps makes equal for everyone.
            "weight": node.num_examples if self.cfg.weighting == "num-examples" else 1,
            "bytes_received": checked.bytes_received, "delta_norm": norm,
            "metrics": checked.metrics,
        }
        if self.cfg.clip_delta_norm is not None:
            outcome["clipped"] = norm > self.cfg.clip_delta_norm
        if checked.ignored_metrics:
            outcome["ignored_metrics"] = checked.ignored_metrics
        return outcome, delta

    def _round_record(self, pending: PendingRound, outcomes: dict[int, dict[str, Any]]) -> dict[str, Any]:
        rows = [{"node_id": n.node_id, "partition_id": n.partition_id, "domain": n.domain,
                 "capacity": n.max_layers, **({"architecture": n.architecture} if n.architecture else {})}
                for n in pending.nodes]
        clients = [{**outcomes[row["node_id"]], **row, "layers": layers_of(pending.matrix, i),
                    "bytes_sent": pending.bytes_sent[row["node_id"]]} for i, row in enumerate(rows)]
        trained = [outcomes[n.node_id]["status"] == "ok" for n in pending.nodes]
        return {
            "round": pending.server_round,
            "method": self.cfg.method,
            "allocation": pending.matrix.astype(int).tolist(),
            "rows": rows,
            "clients": clients,
            "blocks_trained": pending.matrix[trained].sum(axis=0).astype(int).tolist(),
            "failures": [{"node_id": c["node_id"], "partition_id": c["partition_id"], "status": c["status"],
                          "reason": c["reason"]} for c in clients if c["status"] != "ok"],
            "train_wall_seconds": time.perf_counter() - pending.started,
        }

    @staticmethod
    def _train_metrics(outcomes: dict[int, dict[str, Any]]) -> MetricRecord:
        ok = [o for o in outcomes.values() if o["status"] == "ok"]
        total = sum(o["num_examples"] for o in ok)
        metrics = {"num-examples": total, "clients-ok": len(ok), "clients-failed": len(outcomes) - len(ok)}
        for key in ("train_loss", "train_accuracy"):
            values = [(o["metrics"][key], o["num_examples"]) for o in ok if key in o["metrics"]]
            if values:
                metrics[key.replace("_", "-")] = sum(v * n for v, n in values) / max(total, 1)
        return MetricRecord(metrics)

    # ------------------------------------------------------------ calibrate
    def calibrate(self, state: State, server_round: int) -> State:
        """``state`` with its head refit to every connected node's feature sums (``fedra_core.calibration``).

        Each node runs the whole global model over its training images and replies three
        sums; a reply that fails a check is left out, and with no valid reply (or a
        head that comes out non-finite) the state is returned unchanged. What happened
        goes into the round's record as ``calibration``. The calibrated head is the
        global model's (evaluated and saved); the next round's clients still train the
        averaged head (``training_head``), so calibrating never changes how they train.
        """
        start = time.perf_counter()
        grid = self.grid
        if grid is None:
            raise RuntimeError("calibrate called before configure_train")
        weight_key, _ = head_keys(state)
        num_classes, dim = state[weight_key].shape
        connected = set(grid.get_node_ids())
        nodes = {n.node_id: n for n in self.nodes.values() if n.node_id in connected}
        record = to_record(state, self.cfg.wire_dtype)
        cfg = ConfigRecord({"server-round": server_round, "wire-dtype": self.cfg.wire_dtype,
                            "experiment": self._experiment_json})
        messages = [Message(content=RecordDict({"arrays": record, "config": cfg}), message_type=CALIBRATE,
                            dst_node_id=node_id) for node_id in sorted(nodes)]
        log(INFO, "calibrate: %d clients send the features' sums of the global model of round %d",
            len(messages), server_round)
        stats, failures, received, accepted = {}, {}, 0, []
        for reply in grid.send_and_receive(messages, timeout=self.cfg.reply_timeout):
            node_id = node_of_reply(reply, messages)
            if node_id not in nodes or node_id in stats or node_id in failures:
                continue
            try:
                if reply.has_error():
                    raise InvalidReply(reply.error.reason)
                stats[node_id], size, metrics = read_calibration_reply(reply, dim, num_classes,
                                                                       nodes[node_id].num_examples)
                received += size
                accepted.append({"node_id": node_id, "partition_id": nodes[node_id].partition_id,
                                 "examples": stats[node_id].examples, **metrics})
            except InvalidReply as err:
                failures[node_id] = {"node_id": node_id, "partition_id": nodes[node_id].partition_id,
                                     "status": "failed" if reply.has_error() else "rejected", "reason": err.reason}
                log(WARNING, "Calibration statistics of client %d %s: %s", node_id, failures[node_id]["status"],
                    err.reason)
        for node_id in set(nodes) - set(stats) - set(failures):
            failures[node_id] = {"node_id": node_id, "partition_id": nodes[node_id].partition_id, "status": "failed",
                                 "reason": "no reply within the timeout"}
        info: dict[str, Any] = {"bytes_sent_per_node": serialized_bytes(record), "bytes_received": received,
                                "clients": sorted(accepted, key=lambda c: c["partition_id"]),
                                "failures": [failures[n] for n in sorted(failures)]}
        try:
            calibrated, done = calibrate_state(state, [stats[n] for n in sorted(stats)], self.cfg.calibration_shrinkage)
            if not is_finite_state(calibrated):
                raise CalibrationError("the calibrated head is not finite")
            info.update(done, status="ok")
        except CalibrationError as err:
            calibrated = state
            info.update(status="skipped", reason=str(err))
            log(WARNING, "Round %d: the head was not calibrated: %s", server_round, err)
        info["seconds"] = time.perf_counter() - start
        self.last_record["calibration"] = info
        return calibrated

    # ------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send every known node the whole global model when the nodes evaluate this round."""
        self.last_eval = None
        evaluation = self.experiment.evaluation
        actual = self.round_offset + server_round
        if not evaluation.on_clients or not evaluation.due(actual, self.experiment.training.rounds):
            self.pending_eval = None
            return []
        return self._evaluate_messages(actual, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Check each node's evaluation, then aggregate per domain into ``last_eval``."""
        pending = self.pending_eval
        if pending is None:
            return None
        self.pending_eval = None
        nodes = {n.node_id: n for n in pending.nodes}
        evaluations: dict[int, NodeEvaluation] = {}
        failures: dict[int, dict[str, Any]] = {}
        for reply in replies:
            node_id = node_of_reply(reply, pending.messages)
            if node_id not in nodes or node_id in evaluations or node_id in failures:
                continue
            node = nodes[node_id]
            try:
                if reply.has_error():
                    raise InvalidReply(reply.error.reason)
                checked = read_eval_reply(reply)
            except InvalidReply as err:
                status = "failed" if reply.has_error() else "rejected"
                failures[node_id] = {"node_id": node_id, "partition_id": node.partition_id, "status": status,
                                     "reason": err.reason}
                log(WARNING, "Evaluation of client %d %s: %s", node_id, status, err.reason)
                continue
            evaluations[node_id] = NodeEvaluation(node_id, node.partition_id, node.domain, checked.loss,
                                                  checked.accuracy, checked.num_examples, checked.ensemble_accuracy)
        for node in pending.nodes:
            if node.node_id not in evaluations and node.node_id not in failures:
                failures[node.node_id] = {"node_id": node.node_id, "partition_id": node.partition_id,
                                          "status": "failed", "reason": "no reply within the timeout"}
        self.last_eval = aggregate_evaluations(list(evaluations.values()), list(failures.values()))
        self.last_eval["bytes_sent_per_node"] = pending.bytes_sent
        self.last_eval["wall_seconds"] = time.perf_counter() - pending.started  # send, evaluate, reply
        mean = self.last_eval["mean_accuracy"]
        return MetricRecord({"client-mean-accuracy": mean}) if mean is not None else None

    def evaluate_now(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> dict[str, Any] | None:
        """Have the nodes evaluate ``arrays`` outside the training loop (the untuned model, round 0)."""
        messages = self._evaluate_messages(server_round, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=self.cfg.reply_timeout))
        return self.last_eval

    def _evaluate_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        state = _sendable(arrays)
        connected = set(grid.get_node_ids())
        nodes = sorted((n for n in self.nodes.values() if n.node_id in connected), key=lambda n: n.partition_id)
        record = to_record(state, self.cfg.wire_dtype)
        cfg = ConfigRecord({**config, "server-round": server_round, "wire-dtype": self.cfg.wire_dtype,
                            "experiment": self._experiment_json})
        messages = [Message(content=RecordDict({"arrays": record, "config": cfg}), message_type=MessageType.EVALUATE,
                            dst_node_id=n.node_id) for n in nodes]
        self.pending_eval = PendingEvaluation(server_round, nodes, messages, serialized_bytes(record))
        log(INFO, "configure_evaluate: %d clients evaluate the global model of round %d", len(nodes), server_round)
        return messages
