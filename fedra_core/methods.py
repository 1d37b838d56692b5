"""Every tuning method as one object behind a small protocol, registered by name.

A method says, in one place, everything that differs between methods:

| hook                | where it runs | what it decides                                              |
|---------------------|---------------|--------------------------------------------------------------|
| ``allocate``        | server        | which blocks each sampled client holds this round            |
| ``max_blocks``      | node          | the most blocks a node may be sent                           |
| ``architecture_of`` | both          | which backbone a client runs (HeteroTune: one per client)    |
| ``build``           | both          | the adapters and extra modules added to an assembled model   |
| ``trainable_state`` / ``load_state`` | both | the model's trainable tensors under global names     |
| ``sendable``        | server        | the part of the global state a client is sent                |
| ``loss``            | node          | the training loop's loss in a round                          |
| ``aggregate``       | server        | the step from the round's deltas to the new global state      |
| ``global_layers`` / ``classifiers`` | both | which global model is evaluated, and how it is scored |
| ``assemble`` / ``split_received`` | node | the (sub-)model read from the cache, and what else a task carries |
| ``prepare`` / ``extras`` | server | work before the first round; what else a client is sent (surrogates) |

``method_for(experiment)`` returns the experiment's method; a method keeps what it
carries across rounds on the server in ``memory`` (InclusiveFL's momentum), which the
run checkpoints under ``memory_prefix``. Adding a method means adding one class here
(and its machinery beside it, e.g. ``fedra_core.hetero``) decorated with ``@register``.

This module imports no torch, timm or peft at import time: the experiment's validation
reads the registered names in processes (a ClientApp forwarding to its warm worker)
that never build a model.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedra_core.allocation import allocate

if TYPE_CHECKING:  # annotations only: torch is imported where a model is built
    from pathlib import Path

    import torch
    from torch import nn

    from fedra_core.backbone import AssemblyStats
    from fedra_core.config import Experiment

    State = dict[str, torch.Tensor]

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` selectable as ``strategy.method: <cls.name>``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def method_class(name: str) -> type["Method"]:
    """The class registered as ``name``; ``KeyError`` naming the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {method_names()}")
    return _REGISTRY[name]


def surrogate_methods() -> tuple[str, ...]:
    """The methods whose clients may put block surrogates in the skipped positions."""
    return tuple(name for name, cls in _REGISTRY.items() if cls.surrogates_allowed)


def method_for(experiment: "Experiment") -> "Method":
    """A fresh instance of the experiment's ``strategy.method``."""
    return method_class(experiment.strategy.method)(experiment)


class Method:
    """FedRA's behaviour; every other method overrides what it changes.

    Parameters
    ----------
    experiment : Experiment
        The run's experiment; the method reads its settings from it.
    """

    name: ClassVar[str] = ""
    allocation: ClassVar[str] = "fedra"  # fedra_core.allocation's rule: fedra, fedra-cover or first
    heterogeneous: ClassVar[bool] = False  # clients run different backbones (backbone.architectures)
    memory_prefix: ClassVar[str] = ""  # checkpoint prefix of ``memory``; empty: the method keeps none
    surrogates_allowed: ClassVar[bool] = False  # ``strategy.surrogates`` may be set (fedra_core.surrogates)
    cross_distill: ClassVar[bool] = False  # ``strategy.distill_steps`` takes effect (fedra_core.crossdistill)

    def __init__(self, experiment: "Experiment") -> None:
        self.experiment = experiment
        self.memory: dict[str, Any] = {}  # server-side state across rounds (checkpointed)

    # ------------------------------------------------------------ who holds what
    def allocate(self, capacities: Sequence[int], depths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """The round's allocation matrix: one row per client, ``max(depths)`` columns.

        ``depths[i]`` is the depth of client i's backbone (the same for every client
        unless the method is heterogeneous); row i only holds blocks below it.
        """
        num_layers = _single_depth(depths)
        return allocate(capacities, num_layers, rng, method=self.allocation)

    def max_blocks(self, node_max_layers: int, num_layers: int) -> int:
        """Most blocks a node may be sent: its capacity."""
        return node_max_layers

    def architecture_of(self, partition_id: int) -> str | None:
        """The backbone architecture client ``partition_id`` runs (None: the experiment's one backbone)."""
        return None

    # ------------------------------------------------------------------- model
    def global_layers(self, num_layers: int) -> list[int] | None:
        """Blocks of the evaluated global model; None for all of them."""
        return None

    def assemble(self, cache_dir: "Path", layers: Sequence[int] | None, num_classes: int,
                 device: "str | torch.device" = "cpu", extras: Mapping[str, "torch.Tensor"] | None = None
                 ) -> tuple["nn.Module", "AssemblyStats"]:
        """The (sub-)model of ``layers`` read from the cache, before ``build``; ``extras``: see ``split_received``."""
        from fedra_core.backbone import assemble

        return assemble(cache_dir, layers, num_classes, device)

    def split_received(self, received: Mapping[str, "torch.Tensor"]) -> tuple["State", "State"]:
        """A task's arrays as (the trainable state the client trains, what else the method sent for the model)."""
        return dict(received), {}

    def build(self, model: "nn.Module", num_classes: int, num_layers: int,
              architecture: str | None = None) -> "nn.Module":
        """Freeze an assembled (sub-)model and add the method's trainable parts (LoRA and the head)."""
        from fedra_core.lora import attach_lora

        return attach_lora(model, self.experiment.backbone.lora, head_seed=self.experiment.seed)

    def trainable_state(self, model: "nn.Module", architecture: str | None = None) -> "State":
        """A copy of the model's trainable tensors, under global names."""
        from fedra_core.lora import trainable_state

        return trainable_state(model)

    def load_state(self, model: "nn.Module", state: Mapping[str, "torch.Tensor"],
                   architecture: str | None = None) -> None:
        """Load a global-named state: exactly the model's trainable tensors."""
        from fedra_core.lora import load_trainable_state

        load_trainable_state(model, state)

    def loss(self, server_round: int) -> Callable[..., Any]:
        """The training loop's loss in ``server_round``."""
        from fedra_core.training import cross_entropy_loss

        return cross_entropy_loss

    def classifiers(self) -> Callable[..., Any] | None:
        """How to read all of the model's classifiers for an ensemble score; None: only its head."""
        return None

    # ------------------------------------------------------------------ server
    def architectures(self) -> tuple[str, ...]:
        """The architectures whose global models the run keeps and evaluates; () for one backbone."""
        return ()

    def sendable(self, state: Mapping[str, "torch.Tensor"], layers: Sequence[int],
                 architecture: str | None = None, depth: int | None = None) -> "State":
        """The part of the global state a client holding ``layers`` (of a ``depth``-block backbone) is sent."""
        from fedra_core.lora import slice_state

        return slice_state(state, list(layers))

    def aggregate(self, global_state: Mapping[str, "torch.Tensor"], deltas: Sequence[Mapping[str, "torch.Tensor"]],
                  weights: Sequence[float] | None, architectures: Sequence[str | None]
                  ) -> tuple["State", dict[str, Any]]:
        """The new global state from the round's accepted deltas, and what to record about the step.

        FedRA's: each tensor averaged over the clients that trained it.
        """
        from fedra_core.aggregation import masked_average

        return masked_average(global_state, deltas, weights), {}

    def prepare(self, cache_dir: "Path") -> dict[str, Any]:
        """Server-side work on its backbone cache before the first round; what to record in the run's config."""
        return {}

    def extras(self, layers: Sequence[int], depth: int) -> "State":
        """What a client holding ``layers`` is sent beside its trainable state (see ``returns_extras``)."""
        return {}

    @property
    def returns_extras(self) -> bool:
        """Whether a client trains what ``extras`` sends it and returns its deltas too."""
        return False

    def load_memory(self, memory: Mapping[str, Any]) -> None:
        """Continue from a checkpoint's memory (keys without ``memory_prefix``)."""
        if memory and not self.memory_prefix:
            raise ValueError(f"the checkpoint holds server state that method {self.name!r} does not keep: "
                             f"{sorted(memory)[:3]}")
        self.memory = dict(memory)


def _single_depth(depths: Sequence[int]) -> int:
    if not depths:
        return 0
    if len(set(depths)) != 1:
        raise ValueError(f"clients run backbones of different depths {sorted(set(depths))}; "
                         "only a heterogeneous method (hetero, isolated) allows that")
    return depths[0]


# ------------------------------------------------------------------- depth heterogeneity
@register
class FedRA(Method):
    """FedRA (Su et al., ECCV 2024): each client holds ``k_i`` blocks drawn uniformly at random.

    With ``strategy.surrogates``, a client's sub-model runs a block surrogate in each
    skipped position (``fedra_core.surrogates``): ``frozen`` ones read from the cache's
    file, ``redistill`` ones the server re-distills from the current global blocks
    every ``surrogates_every`` rounds and sends (its ``memory``, checkpointed), or
    ``tuned`` ones the server sends, the clients train beside their adapters and return,
    and the server averages block by block (``returns_extras``).
    """

    name = "fedra"
    surrogates_allowed = True

    def __init__(self, experiment: "Experiment") -> None:
        super().__init__(experiment)
        self.stand_ins = None
        if experiment.strategy.surrogates:
            from fedra_core.surrogates import PREFIX, StandIns

            self.stand_ins = StandIns(experiment)
            if self.stand_ins.sends:
                self.memory_prefix = PREFIX  # type: ignore[misc]  # the server's current surrogates

    def assemble(self, cache_dir: "Path", layers: Sequence[int] | None, num_classes: int,
                 device: "str | torch.device" = "cpu", extras: Mapping[str, "torch.Tensor"] | None = None
                 ) -> tuple["nn.Module", "AssemblyStats"]:
        model, stats = super().assemble(cache_dir, layers, num_classes, device, extras)
        if self.stand_ins is None:
            return model, stats
        return self.stand_ins.fill(model, stats, cache_dir, device, extras or {})

    def split_received(self, received: Mapping[str, "torch.Tensor"]) -> tuple["State", "State"]:
        if self.stand_ins is None:
            return super().split_received(received)
        return self.stand_ins.split(received)

    def prepare(self, cache_dir: "Path") -> dict[str, Any]:
        return {} if self.stand_ins is None else self.stand_ins.prepare(cache_dir)

    def extras(self, layers: Sequence[int], depth: int) -> "State":
        if self.stand_ins is None or not self.stand_ins.sends:
            return {}
        return self.stand_ins.to_send(self.memory, layers, depth)

    @property
    def returns_extras(self) -> bool:
        return self.stand_ins is not None and self.stand_ins.tuned

    def load_state(self, model: "nn.Module", state: Mapping[str, "torch.Tensor"],
                   architecture: str | None = None) -> None:
        super().load_state(model, state, architecture)
        if self.returns_extras and hasattr(model, "surrogates"):  # trained beside the adapters from here on
            for param in model.surrogates.parameters():
                param.requires_grad_(True)

    def aggregate(self, global_state: Mapping[str, "torch.Tensor"], deltas: Sequence[Mapping[str, "torch.Tensor"]],
                  weights: Sequence[float] | None, architectures: Sequence[str | None]
                  ) -> tuple["State", dict[str, Any]]:
        if self.returns_extras:
            from fedra_core.surrogates import PREFIX

            extras = [{k: v for k, v in d.items() if k.startswith(PREFIX)} for d in deltas]
            deltas = [{k: v for k, v in d.items() if not k.startswith(PREFIX)} for d in deltas]
        state, info = super().aggregate(global_state, deltas, weights, architectures)
        if self.returns_extras:
            info = {**info, "surrogates": self.stand_ins.average(self.memory, extras, weights)}
        elif self.stand_ins is not None and self.stand_ins.redistill:
            info = {**info, "surrogates": self.stand_ins.after_round(self.memory, state)}
        return state, info


@register
class FedRACover(FedRA):
    """FedRA whose random allocation covers every block each round when the capacities allow."""

    name = "fedra-cover"
    allocation = "fedra-cover"


@register
class First(Method):
    """Depth-first sub-models: client i holds blocks ``0..k_i-1``; plain masked averaging."""

    name = "first"
    allocation = "first"


@register
class AllLarge(Method):
    """The ceiling: every client holds every block, whatever its capacity (simulation only)."""

    name = "all-large"
    allocation = "first"

    def allocate(self, capacities: Sequence[int], depths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        num_layers = _single_depth(depths)
        return allocate([num_layers] * len(capacities), num_layers, rng, method="first")

    def max_blocks(self, node_max_layers: int, num_layers: int) -> int:
        return num_layers


@register
class AllSmall(Method):
    """Everyone trains and is evaluated on the smallest client's first ``k_min`` blocks."""

    name = "all-small"
    allocation = "first"

    @property
    def depth(self) -> int:
        """The smallest capacity among all clients of the experiment."""
        return min(self.experiment.clients.capacities)

    def allocate(self, capacities: Sequence[int], depths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        num_layers = _single_depth(depths)
        return allocate([min(self.depth, num_layers)] * len(capacities), num_layers, rng, method="first")

    def global_layers(self, num_layers: int) -> list[int] | None:
        return list(range(min(self.depth, num_layers)))


@register
class InclusiveFL(Method):
    """InclusiveFL (Liu et al., KDD 2022): depth-first, with the reference code's momentum distillation."""

    name = "inclusivefl"
    allocation = "first"
    memory_prefix = "inclusivefl_momentum."

    def aggregate(self, global_state: Mapping[str, "torch.Tensor"], deltas: Sequence[Mapping[str, "torch.Tensor"]],
                  weights: Sequence[float] | None, architectures: Sequence[str | None]
                  ) -> tuple["State", dict[str, Any]]:
        mix = self.experiment.strategy.inclusivefl_momentum
        if mix <= 0:
            return super().aggregate(global_state, deltas, weights, architectures)
        from fedra_core.baselines import inclusivefl_aggregate

        return inclusivefl_aggregate(global_state, deltas, self.memory, mix, weights), {}


@register
class DepthFL(Method):
    """DepthFL (Kim et al., ICLR 2023): depth-first, a classifier every few blocks, self-distillation."""

    name = "depthfl"
    allocation = "first"

    def build(self, model: "nn.Module", num_classes: int, num_layers: int,
              architecture: str | None = None) -> "nn.Module":
        from fedra_core.baselines import attach_exits

        model = super().build(model, num_classes, num_layers, architecture)
        return attach_exits(model, num_classes, self.experiment.strategy.depthfl_exit_every, num_layers)

    def loss(self, server_round: int) -> Callable[..., Any]:
        from functools import partial

        from fedra_core.baselines import depthfl_loss, distill_weight

        return partial(depthfl_loss, distill_weight=distill_weight(self.experiment.strategy, server_round))

    def classifiers(self) -> Callable[..., Any] | None:
        from fedra_core.baselines import classifier_logits

        return classifier_logits


# ------------------------------------------------------------------- model heterogeneity
@register
class Hetero(Method):
    """HeteroTune after its abstracts (this project's design, ``fedra_core.hetero``).

    Clients run different backbones (``clients.architectures``); each holds random blocks
    of its own backbone as FedRA (its capacity relative to that backbone's depth) and
    trains DeMA adapters whose cores are shared across architectures; with
    ``strategy.cmga`` the shared tensors' updates are aligned across architectures.
    """

    name = "hetero"
    heterogeneous = True
    share = True  # shared parts under shared names; ``isolated`` gives them the architecture's
    cross_distill = True

    def architecture_of(self, partition_id: int) -> str | None:
        return self.experiment.clients.architectures[partition_id]

    def architectures(self) -> tuple[str, ...]:
        return self.experiment.backbone.architecture_names

    def allocate(self, capacities: Sequence[int], depths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """FedRA's random allocation inside each client's own backbone; columns beyond its depth stay empty."""
        width = max(depths, default=0)
        matrix = np.zeros((len(capacities), width), dtype=bool)
        for row, (capacity, depth) in enumerate(zip(capacities, depths)):
            matrix[row, :depth] = allocate([capacity], depth, rng, method="fedra")[0]
        return matrix

    def build(self, model: "nn.Module", num_classes: int, num_layers: int,
              architecture: str | None = None) -> "nn.Module":
        from fedra_core.hetero import attach_dema

        return attach_dema(model, self.experiment.backbone.adapter, num_layers, num_classes, self.experiment.seed)

    def trainable_state(self, model: "nn.Module", architecture: str | None = None) -> "State":
        from fedra_core.hetero import trainable_state

        return trainable_state(model, _named(architecture), self.share)

    def load_state(self, model: "nn.Module", state: Mapping[str, "torch.Tensor"],
                   architecture: str | None = None) -> None:
        from fedra_core.hetero import load_state

        load_state(model, state, _named(architecture), self.share)

    def sendable(self, state: Mapping[str, "torch.Tensor"], layers: Sequence[int],
                 architecture: str | None = None, depth: int | None = None) -> "State":
        from fedra_core.hetero import needed

        if depth is None:
            raise ValueError("a heterogeneous method slices the state by the client's backbone depth")
        slots = self.experiment.backbone.adapter.slots
        return {k: v for k, v in state.items()
                if needed(k, _named(architecture), layers, depth, slots, self.share)}

    def aggregate(self, global_state: Mapping[str, "torch.Tensor"], deltas: Sequence[Mapping[str, "torch.Tensor"]],
                  weights: Sequence[float] | None, architectures: Sequence[str | None]
                  ) -> tuple["State", dict[str, Any]]:
        if not (self.share and self.experiment.strategy.cmga):
            return super().aggregate(global_state, deltas, weights, architectures)
        from fedra_core.hetero import cmga_aggregate

        state, info = cmga_aggregate(global_state, deltas, weights, [_named(a) for a in architectures])
        return state, {"cmga": info}


@register
class Isolated(Hetero):
    """The baseline without cross-model sharing: each architecture tunes only with its own clients."""

    name = "isolated"
    share = False
    cross_distill = False


@register
class HeteroLargest(Hetero):
    """The upper reference: every client runs the largest architecture (listed last), all of its blocks."""

    name = "hetero-largest"
    cross_distill = False  # one architecture: no other model to learn from

    @property
    def largest(self) -> str:
        return self.experiment.backbone.architecture_names[-1]

    def architecture_of(self, partition_id: int) -> str | None:
        return self.largest

    def architectures(self) -> tuple[str, ...]:
        return (self.largest,)

    def allocate(self, capacities: Sequence[int], depths: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        return super().allocate(depths, depths, rng)

    def max_blocks(self, node_max_layers: int, num_layers: int) -> int:
        return num_layers


def _named(architecture: str | None) -> str:
    if not architecture:
        raise ValueError("a heterogeneous method needs the client's architecture")
    return architecture
