"""The paper's baselines: their allocations, DepthFL's exits and loss, InclusiveFL's momentum.

Every method shares FedRA's Strategy, ClientApp and training loop; a baseline differs
only in which blocks each client holds (``allocation_for``), in the depth of the
evaluated global model (``global_layers``) and, for DepthFL, in auxiliary classifiers
and a loss term (``attach_exits``, ``depthfl_loss``).

| method        | client i holds                 | global model evaluated  |
|---------------|--------------------------------|-------------------------|
| ``fedra``     | k_i random blocks              | all blocks              |
| ``all-large`` | every block (ceiling)          | all blocks              |
| ``all-small`` | blocks 0..k_min-1              | blocks 0..k_min-1       |
| ``inclusivefl``, ``depthfl``, ``first`` | blocks 0..k_i-1 | all blocks       |
"""

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn

from fedra_core.allocation import allocate
from fedra_core.config import Experiment
from fedra_core.training import LossFn, cross_entropy_loss

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


def prepare_model(model: nn.Module, experiment: Experiment, num_classes: int, num_layers: int) -> nn.Module:
    """Add what the method needs beyond LoRA and the head (DepthFL's exits); after ``attach_lora``."""
    if experiment.strategy.method == "depthfl":
        return attach_exits(model, num_classes, experiment.strategy.depthfl_exit_every, num_layers)
    return model


def loss_for(experiment: Experiment) -> LossFn:
    """The training loop's loss for the method: DepthFL's, else plain cross-entropy."""
    if experiment.strategy.method == "depthfl":
        return partial(depthfl_loss, distill_weight=experiment.strategy.depthfl_distill_weight)
    return cross_entropy_loss


# ---------------------------------------------------------------- InclusiveFL
def _block_suffix(key: str) -> tuple[int, str] | None:
    parts = key.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def momentum_distill(new_state: Mapping[str, torch.Tensor], old_state: Mapping[str, torch.Tensor],
                     depths: Sequence[int], momentum: dict[str, torch.Tensor], beta: float
                     ) -> dict[str, torch.Tensor]:
    """InclusiveFL's momentum distillation on the aggregated state (Liu et al., KDD 2022).

    For every client depth ``k`` below the deepest one of the round, the top block
    ``k-1`` of that shallow model receives ``beta`` times a momentum of the mean
    update of the blocks above it (``k..K-1``) that only the deeper clients trained,
    tensor by tensor (blocks share shapes). ``momentum`` (key of the top tensor ->
    running average) is updated in place; the states are not modified.

    Parameters
    ----------
    new_state, old_state : Mapping[str, Tensor]
        The global state after and before this round's averaging.
    depths : Sequence[int]
        Number of (first) blocks each participating client held.
    momentum : dict[str, Tensor]
        Running momentum per top-block tensor, kept by the caller across rounds.
    beta : float
        Momentum coefficient in [0, 1); 0 returns ``new_state`` unchanged.

    Returns
    -------
    dict[str, Tensor]
        The state with the distilled updates added to the shallow models' top blocks.
    """
    out = dict(new_state)
    if beta <= 0 or not depths:
        return out
    deepest = max(depths)
    by_block: dict[int, dict[str, str]] = {}
    for key in new_state:
        parsed = _block_suffix(key)
        if parsed:
            by_block.setdefault(parsed[0], {})[parsed[1]] = key
    for k in sorted(set(d for d in depths if d < deepest)):
        for suffix, top_key in by_block.get(k - 1, {}).items():
            upper = [by_block[b][suffix] for b in range(k, deepest) if suffix in by_block.get(b, {})]
            if not upper:
                continue
            update = torch.stack([new_state[u] - old_state[u] for u in upper]).mean(dim=0)
            momentum[top_key] = beta * momentum.get(top_key, torch.zeros_like(update)) + (1 - beta) * update
            out[top_key] = out[top_key] + beta * momentum[top_key]
    return out
