"""The paper's baselines: their allocations, DepthFL's exits, loss and ensemble, InclusiveFL's aggregation.

Every method shares FedRA's Strategy, ClientApp and training loop; a baseline differs
only in which blocks each client holds (``allocation_for``), in the depth of the
evaluated global model (``global_layers``) and, for DepthFL, in auxiliary classifiers
and a loss term (``attach_exits``, ``depthfl_loss``), and for InclusiveFL in a server-side
aggregation with momentum distillation (``inclusivefl_aggregate``).

| method        | client i holds                 | global model evaluated  |
|---------------|--------------------------------|-------------------------|
| ``fedra``     | k_i random blocks              | all blocks              |
| ``all-large`` | every block (ceiling)          | all blocks              |
| ``all-small`` | blocks 0..k_min-1              | blocks 0..k_min-1       |
| ``inclusivefl``, ``depthfl``, ``first`` | blocks 0..k_i-1 | all blocks       |
"""

import math
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from fedra_core.aggregation import masked_average
from fedra_core.allocation import allocate
from fedra_core.config import Experiment, StrategyConfig
from fedra_core.training import ClassifiersFn, LossFn, cross_entropy_loss

DEPTH_FIRST = ("first", "inclusivefl", "depthfl")
EXIT_NAME = "exit"  # DepthFL's classifier after block i is ``blocks.<i>.exit``: a global name


def allocation_for(experiment: Experiment, capacities: Sequence[int], num_layers: int,
                   rng: np.random.Generator) -> np.ndarray:
    """The round's allocation matrix for the experiment's method.

    Parameters
    ----------
    experiment : Experiment
        Its ``strategy.method`` selects the allocation; ``clients.capacities`` gives
        ``all-small`` its depth (the smallest capacity of the whole system).
    capacities : Sequence[int]
        Declared capacity of each sampled client (one row each).
    num_layers : int
        Depth of the backbone.
    rng : numpy.random.Generator
        Used by the random methods only.

    Returns
    -------
    numpy.ndarray
        Boolean ``(len(capacities), num_layers)`` matrix.
    """
    method = experiment.strategy.method
    if method in ("fedra", "fedra-cover"):
        return allocate(capacities, num_layers, rng, method=method)
    if method in DEPTH_FIRST:
        return allocate(capacities, num_layers, rng, method="first")
    if method == "all-large":
        return allocate([num_layers] * len(capacities), num_layers, rng, method="first")
    if method == "all-small":
        return allocate([small_depth(experiment)] * len(capacities), num_layers, rng, method="first")
    raise ValueError(f"strategy.method {method!r} has no allocation")


def small_depth(experiment: Experiment) -> int:
    """Depth of ``all-small``'s system: the smallest capacity among all clients."""
    return min(experiment.clients.capacities)


def global_layers(experiment: Experiment, num_layers: int) -> list[int] | None:
    """Blocks of the evaluated global model: ``None`` (all) except for ``all-small``."""
    if experiment.strategy.method == "all-small":
        return list(range(min(small_depth(experiment), num_layers)))
    return None


def max_blocks(experiment: Experiment, node_max_layers: int, num_layers: int) -> int:
    """Most blocks a node may be sent: its capacity, or every block for the ``all-large`` ceiling."""
    return num_layers if experiment.strategy.method == "all-large" else node_max_layers


# ---------------------------------------------------------------- DepthFL
def exit_blocks(every: int, num_layers: int) -> list[int]:
    """Global blocks followed by an auxiliary classifier: every ``every``-th, the last excluded.

    The last block is followed by the model's own head, so with 12 blocks and
    ``every=3`` the exits sit after blocks 2, 5 and 8 (depths 3, 6, 9).
    """
    return [i for i in range(every - 1, num_layers - 1, every)]


def attach_exits(model: nn.Module, num_classes: int, every: int, num_layers: int) -> nn.Module:
    """Give each held exit block a trainable linear classifier ``blocks.<i>.exit``.

    The classifier reads the block's output through the model's own (frozen) final
    norm and pooling, so it sees the features the head would see at that depth. A
    block's ``forward`` ignores the attribute; only ``depthfl_loss`` calls it.
    """
    for name, block in model.blocks.named_children():
        if int(name) in exit_blocks(every, num_layers):
            exit_head = nn.Linear(model.num_features, num_classes)
            exit_head.to(next(block.parameters()).device)
            setattr(block, EXIT_NAME, exit_head)
    return model


def _exit_logits(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final logits and the logits of every held exit, from one forward pass."""
    features: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [block.register_forward_hook(lambda mod, _inp, out: features.append((mod, out)))
             for block in model.blocks if hasattr(block, EXIT_NAME)]
    try:
        logits = model(images)  # (B, num_classes)
    finally:
        for hook in hooks:
            hook.remove()
    exits = [getattr(block, EXIT_NAME)(model.forward_head(model.norm(x), pre_logits=True))  # (B, C)
             for block, x in features]
    return logits, exits


def depthfl_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 distill_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DepthFL's loss: cross-entropy of every classifier plus mutual self-distillation.

    Each classifier k (the held exits and the head) is also pulled towards every other
    classifier's prediction, ``KL(p_j || p_k)`` with ``p_j`` detached, averaged over
    the others (Kim et al., DepthFL, ICLR 2023). Returns the head's logits.
    """
    logits, exits = _exit_logits(model, images)
    outputs = [*exits, logits]
    loss = sum(nn.functional.cross_entropy(o, labels) for o in outputs)
    if len(outputs) > 1 and distill_weight > 0:
        log_probs = [nn.functional.log_softmax(o.float(), dim=1) for o in outputs]
        distill = sum(nn.functional.kl_div(log_probs[k], log_probs[j].detach(), log_target=True,
                                           reduction="batchmean")
                      for k in range(len(outputs)) for j in range(len(outputs)) if j != k)
        loss = loss + distill_weight * distill / (len(outputs) - 1)
    return logits, loss


def classifier_logits(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every classifier of a DepthFL model: its exits, shallowest first, then the head."""
    logits, exits = _exit_logits(model, images)
    return [*exits, logits]


def classifiers_for(experiment: Experiment) -> ClassifiersFn | None:
    """How to read all of a method's classifiers for scoring their ensemble: DepthFL's, else None."""
    return classifier_logits if experiment.strategy.method == "depthfl" else None


def prepare_model(model: nn.Module, experiment: Experiment, num_classes: int, num_layers: int) -> nn.Module:
    """Add what the method needs beyond LoRA and the head (DepthFL's exits); after ``attach_lora``."""
    if experiment.strategy.method == "depthfl":
        return attach_exits(model, num_classes, experiment.strategy.depthfl_exit_every, num_layers)
    return model


def distill_weight(strategy: StrategyConfig, server_round: int) -> float:
    """DepthFL's self-distillation weight in round ``server_round`` (1, 2, ...).

    Constant (``depthfl_distill_weight``) unless ``depthfl_distill_ramp_rounds`` R is
    set; then it ramps up as ``exp(-5 (1 - min(r, R) / R)^2)`` times that weight, as in
    DepthFL's code and FedRA's reimplementation (0.7% of it in the first of 100 rounds,
    all of it from round R on): early exits learn their labels before they teach.
    """
    ramp = strategy.depthfl_distill_ramp_rounds
    if ramp is None:
        return strategy.depthfl_distill_weight
    phase = 1.0 - min(max(server_round, 0), ramp) / ramp
    return strategy.depthfl_distill_weight * math.exp(-5.0 * phase * phase)


def loss_for(experiment: Experiment, server_round: int) -> LossFn:
    """The training loop's loss for the method in ``server_round``: DepthFL's, else cross-entropy."""
    if experiment.strategy.method == "depthfl":
        return partial(depthfl_loss, distill_weight=distill_weight(experiment.strategy, server_round))
    return cross_entropy_loss


# ---------------------------------------------------------------- InclusiveFL
def _block_suffix(key: str) -> tuple[int, str] | None:
    parts = key.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def _depth_of(delta: Mapping[str, torch.Tensor]) -> int:
    """Depth of the depth-first sub-model a delta comes from: its blocks must be 0..k-1."""
    blocks = sorted({parsed[0] for key in delta if (parsed := _block_suffix(key))})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"InclusiveFL needs depth-first sub-models (blocks 0..k-1); a reply holds {blocks}")
    return len(blocks)


def momentum_key(depth: int, key: str) -> str:
    """Key of the momentum entry holding depth ``depth``'s last delta of ``key``."""
    return f"depth{depth}/{key}"


def _distill_top_block(delta: dict[str, torch.Tensor], small: int, large: int,
                       momentum: Mapping[str, torch.Tensor], mix: float) -> None:
    """Mix into the top block of depth ``small`` the larger depth's last deltas of the blocks it lacks."""
    for key in list(delta):
        parsed = _block_suffix(key)
        if parsed is None or parsed[0] != small - 1 or "lora_" not in key:
            continue
        past = [momentum.get(momentum_key(large, f"blocks.{b}.{parsed[1]}")) for b in range(small, large)]
        known = [p for p in past if p is not None]
        if len(known) < len(past):
            continue  # the larger depth has not reported yet: nothing to distil
        delta[key] = (1 - mix) * delta[key] + mix * torch.stack(known).mean(dim=0)


def inclusivefl_aggregate(global_state: Mapping[str, torch.Tensor],
                          deltas: Sequence[Mapping[str, torch.Tensor]],
                          momentum: dict[str, torch.Tensor], mix: float,
                          weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """InclusiveFL's aggregation with momentum distillation, as the FedRA reference code's ``agg_inclusiveFL``.

    1. The replies are grouped by depth (the depth-first sub-model's number of blocks);
       a group's delta is the (weighted) mean of its members' deltas.
    2. For each pair of adjacent depths ``d < D`` of the round, every LoRA tensor of
       group ``d``'s top block ``d-1`` becomes ``(1 - mix)`` times its own delta plus
       ``mix`` times the mean, over the blocks ``d..D-1`` that only the larger model
       has, of group ``D``'s delta of the same tensor in the last round it took part
       (the reference: 0.8 and 0.2). The distilled top block of ``D`` itself, if ``D``
       is not the deepest, is what the next smaller depth reads: so the deep blocks'
       knowledge flows down depth by depth, and decays over rounds like a momentum.
    3. Every group's LoRA block deltas (after step 2) become ``momentum`` for the
       next round, under ``momentum_key(depth, key)``.
    4. The group deltas are averaged per key over the groups holding it (each depth
       counts once, as the reference does; with ``weights``, by the group's total
       weight) and added to the global state.

    Parameters
    ----------
    global_state : Mapping[str, Tensor]
        The global state before the round.
    deltas : Sequence[Mapping[str, Tensor]]
        One valid reply's delta per client; its blocks must be ``0..k-1``.
    momentum : dict[str, Tensor]
        The groups' last deltas, kept by the caller across rounds; updated in place.
    mix : float
        Share of the larger depth's knowledge in the top block, in [0, 1); 0 gives
        the plain mean over depth groups.
    weights : Sequence[float], optional
        One weight per client; ``None`` counts every client equally.

    Returns
    -------
    dict[str, Tensor]
        The new global state; the inputs are not modified.
    """
    if weights is not None and len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas")
    groups: dict[int, list[int]] = {}
    for i, delta in enumerate(deltas):
        groups.setdefault(_depth_of(delta), []).append(i)
    depths = sorted(groups)
    group_deltas, group_weights = [], []
    for depth in depths:
        members = [deltas[i] for i in groups[depth]]
        member_weights = [1.0] * len(members) if weights is None else [weights[i] for i in groups[depth]]
        zeros = {k: torch.zeros_like(v, dtype=torch.float32) for m in members for k, v in m.items()}
        group_deltas.append(masked_average(zeros, members, member_weights))
        group_weights.append(sum(member_weights))
    if mix > 0:
        for (small, delta), large in zip(zip(depths, group_deltas), depths[1:]):
            _distill_top_block(delta, small, large, momentum, mix)
    for depth, delta in zip(depths, group_deltas):
        momentum.update({momentum_key(depth, k): v.clone() for k, v in delta.items()
                         if "lora_" in k and _block_suffix(k)})
    return masked_average(global_state, group_deltas, None if weights is None else group_weights)
