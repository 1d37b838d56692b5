"""The depth-based baselines' machinery: DepthFL's exits, loss and ensemble, InclusiveFL's aggregation.

Every method shares FedRA's Strategy, ClientApp and training loop; each is one object in
``fedra_core.methods``, which calls what is here: DepthFL's auxiliary classifiers and
loss term (``attach_exits``, ``depthfl_loss``, ``classifier_logits``) and InclusiveFL's
server-side aggregation with momentum distillation (``inclusivefl_aggregate``).

"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedra_core.aggregation import masked_average
from fedra_core.config import StrategyConfig

EXIT_NAME = "exit"  # DepthFL's classifier after block i is ``blocks.<i>.exit``: a global name


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
