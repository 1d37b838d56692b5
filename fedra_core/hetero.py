"""HeteroTune: clients with different backbones tune one federation through shared adapter parts.

HeteroTune (Jia et al., arXiv 2411.16796) publishes only its abstracts: a lightweight
adapter, "DeMA" (Dense Mixture of Adapters), lets models of different size share
knowledge, and "CMGA" (Cross-Model Gradient Alignment) harmonizes their update
directions during aggregation. What follows is this project's own design after those
abstracts, not the authors' code.

The adapter (DeMA). After every block of an architecture of width ``d``::

    h   = gelu(down(x))                          # d -> r, private to the architecture
    c   = h + sum_e softmax(mix)_e * expert_e(h)  # r -> r, experts shared by every architecture
    out = x + up(c)                              # r -> d, private; starts at zero

All experts of a slot are active (a dense mixture) and each block learns its own mixing
weights. The experts live in a space of fixed size ``r`` that every architecture shares;
blocks map to ``slots`` shared slots by relative depth (block ``b`` of a ``D``-block
model uses slot ``floor(b * slots / D)``), so block 3 of an 8-block model and blocks
4-5 of a 12-block one train the same experts. The classifier is the architecture's own
linear head plus a shared one read through a private projection into the same space:
``logits = head(f) + shared_head(proj(f))``.

Global names. Private tensors carry their architecture, ``<arch>/blocks.3.adapter.down.weight``,
``<arch>/head.weight``; shared ones none, ``dema.slot1.experts.0.weight``. The masked
average then needs no change: a shared tensor is averaged over every client that held
its slot, a private one over that architecture's clients. ``isolated`` gives every
tensor its architecture's name, so nothing is shared (the baseline).

CMGA (``cmga_aggregate``). For each shared tensor, the round's mean update of each
architecture is computed; where two architectures' updates point against each other
(negative inner product), the component of one along the other is removed
(``g_a -= (g_a . g_b / |g_b|^2) g_b``, against every other architecture in a fixed
order), then the architectures' updates are averaged, each weighted by its clients'
total weight. Without conflicts this equals the plain mean over clients.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedra_core.aggregation import masked_average
from fedra_core.config import AdapterSettings
from fedra_core.lora import StateMismatchError, State, block_of, check_state_fits

SHARED = "dema."  # local names of the shared parts: dema.slot<j>.…, dema.head.…
ADAPTER = "adapter"  # a block's adapter: blocks.<i>.adapter.…
SEPARATOR = "/"  # <architecture>/<local name>


def slot_of(block: int, depth: int, slots: int) -> int:
    """The shared slot of block ``block`` in a ``depth``-block model: by relative depth."""
    return block * slots // depth


class SharedCore(nn.Module):
    """One slot's experts, shared by every architecture: ``experts`` maps ``r -> r``."""

    def __init__(self, rank: int, experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(rank, rank) for _ in range(experts))

    def forward(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``h + sum_e weights[e] * expert_e(h)`` for ``h`` of shape (..., r)."""
        mixed = torch.stack([expert(h) for expert in self.experts], dim=-1)  # (..., r, E)
        return h + (mixed * weights.to(mixed.dtype)).sum(dim=-1)


class BlockAdapter(nn.Module):
    """A block's DeMA adapter: private down/up projections and mixing weights around a shared core."""

    def __init__(self, dim: int, rank: int, experts: int, core: SharedCore) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.mix = nn.Parameter(torch.zeros(experts))  # uniform mixture to start
        self._core = [core]  # held, not registered: the core is the model's ``dema.slot<j>``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.down(x))
        return self.up(self._core[0](h, torch.softmax(self.mix, dim=0)))


class SharedHead(nn.Module):
    """The architecture's linear head plus the shared classifier read through a private projection."""

    def __init__(self, head: nn.Linear, rank: int, shared: nn.Linear) -> None:
        super().__init__()
        self.private = head
        self.proj = nn.Linear(head.in_features, rank)
        self._shared = [shared]  # held, not registered: it is the model's ``dema.head``

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.private(features) + self._shared[0](self.proj(features))


class InputAdapter(nn.Module):
    """Shared by every architecture: a residual correction of the input image, ``x + conv(gelu(conv(x)))``.

    The image is the one thing every architecture sees in the same space, so what a
    client of one architecture learns here (how its domain's images should look to a
    frozen backbone) applies unchanged to every other. It starts as the identity.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.inner = nn.Conv2d(channels, hidden, 3, padding=1)
        self.outer = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(nn.functional.gelu(self.inner(x)))


def _adapt_input(patch_embed: nn.Module, inputs: tuple) -> tuple:
    return (patch_embed.input_adapter[0](inputs[0]), *inputs[1:])


def _add_adapter(block: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return output + block.adapter(output)


def _seeded(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@torch.no_grad()
def _draw_linear(layer: nn.Linear | nn.Conv2d, generator: torch.Generator) -> None:
    """Re-draw a linear (or convolution) layer with ``nn.Linear``'s uniform bound, from ``generator`` alone."""
    bound = 1.0 / (layer.weight[0].numel() ** 0.5)
    for param in (layer.weight, layer.bias):
        param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)


def attach_dema(model: nn.Module, settings: AdapterSettings, depth: int, num_classes: int, seed: int) -> nn.Module:
    """Freeze an assembled (sub-)model and add DeMA adapters after its blocks, and the shared head.

    Parameters
    ----------
    model : nn.Module
        A timm ViT assembled from an architecture's cache (some or all of its blocks,
        named by their index in the whole model).
    settings : AdapterSettings
        The shared space's size ``rank``, the ``experts`` per slot and the ``slots``.
    depth : int
        The architecture's whole depth (blocks map to slots by relative depth).
    num_classes : int
        Size of the label space.
    seed : int
        The run's seed: the shared parts start from it alone, so every architecture,
        client and the server draw the same ones.

    Returns
    -------
    nn.Module
        The same model with ``model.dema`` (the shared slots its blocks use and the
        shared head), ``blocks.<i>.adapter`` and ``head`` replaced by ``SharedHead``.
    """
    if settings.slots > depth:
        raise ValueError(f"backbone.adapter.slots = {settings.slots} exceeds the depth {depth} of an architecture")
    for param in model.parameters():
        param.requires_grad_(False)
    device = next(model.parameters()).device
    model.dema = nn.ModuleDict()
    for name, block in model.blocks.named_children():
        slot = slot_of(int(name), depth, settings.slots)
        key = f"slot{slot}"
        if key not in model.dema:
            core = SharedCore(settings.rank, settings.experts)
            for e, expert in enumerate(core.experts):
                _draw_linear(expert, _seeded(seed, 1 + slot * 64 + e))
            model.dema[key] = core.to(device)
        block.adapter = BlockAdapter(model.num_features, settings.rank, settings.experts,
                                     model.dema[key]).to(device)
        block.register_forward_hook(_add_adapter)
    if settings.input_hidden:
        adapter = InputAdapter(model.patch_embed.proj.in_channels, settings.input_hidden)
        _draw_linear(adapter.inner, _seeded(seed, 1_000_000))
        model.dema["input"] = adapter.to(device)
        model.patch_embed.input_adapter = [model.dema["input"]]  # held, not registered
        model.patch_embed.register_forward_pre_hook(_adapt_input)
    shared_head = nn.Linear(settings.rank, num_classes)
    _draw_linear(shared_head, _seeded(seed, 0))
    model.dema["head"] = shared_head.to(device)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"HeteroTune needs a linear head, got {type(head).__name__}")
    model.head = SharedHead(head, settings.rank, model.dema["head"]).to(device)
    for param in [*model.dema.parameters(), *model.head.parameters(),
                  *(p for b in model.blocks for p in b.adapter.parameters())]:
        param.requires_grad_(True)
    return model


def global_name(local: str, architecture: str, share: bool = True) -> str:
    """The global name of a local tensor: shared parts keep theirs, private ones carry the architecture."""
    if share and local.startswith(SHARED):
        return local
    return f"{architecture}{SEPARATOR}{local}"


def local_name(key: str, architecture: str) -> str | None:
    """The local name of a global key for ``architecture``; None when the key is another's private one."""
    if SEPARATOR not in key:
        return key if key.startswith(SHARED) else None
    owner, local = key.split(SEPARATOR, 1)
    return local if owner == architecture else None


def trainable_state(model: nn.Module, architecture: str, share: bool = True) -> State:
    """Copy of every trainable tensor of a DeMA model, under global names."""
    return {global_name(k, architecture, share): p.detach().clone()
            for k, p in model.named_parameters() if p.requires_grad}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], architecture: str, share: bool = True) -> None:
    """Load a global-named state: exactly the model's trainable tensors, for this architecture."""
    expected = trainable_state(model, architecture, share)
    check_state_fits(expected, state)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            local = local_name(key, architecture) if share else key.split(SEPARATOR, 1)[1]
            if local is None or local not in params:
                raise StateMismatchError(f"{key} is not a tensor of architecture {architecture!r}")
            params[local].copy_(value.to(params[local].dtype))


def needed(key: str, architecture: str, layers: Sequence[int], depth: int, slots: int, share: bool = True) -> bool:
    """Whether a client of ``architecture`` (``depth`` blocks) holding ``layers`` needs global ``key``."""
    local = local_name(key, architecture)
    if local is None:
        return False
    if not share and SEPARATOR not in key:
        return False  # isolated: nothing is shared
    if local.startswith(SHARED + "slot"):
        slot = int(local[len(SHARED + "slot"):].split(".", 1)[0])
        return slot in {slot_of(b, depth, slots) for b in layers}
    block = block_of(local)
    return block is None or block in set(layers)


def cmga_aggregate(global_state: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]],
                   weights: Sequence[float] | None, architectures: Sequence[str]
                   ) -> tuple[State, dict[str, Any]]:
    """Average with cross-model gradient alignment on the shared tensors (see the module's docstring).

    Parameters
    ----------
    global_state : Mapping[str, Tensor]
        The global state before the round.
    deltas : Sequence[Mapping[str, Tensor]]
        One accepted reply's delta per client.
    weights : Sequence[float], optional
        One weight per client; ``None`` counts every client equally.
    architectures : Sequence[str]
        The architecture of each client.

    Returns
    -------
    tuple[dict, dict]
        The new global state (inputs unchanged), and what CMGA did: ``tensors`` (shared
        tensors held by two or more architectures), ``pairs`` (architecture pairs
        compared), ``conflicts`` (pairs with a negative inner product before alignment),
        ``resolved`` (projections applied) and ``mean_cosine`` over the compared pairs.
    """
    if len(architectures) != len(deltas):
        raise ValueError(f"got {len(architectures)} architectures for {len(deltas)} deltas")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    new_state = masked_average(global_state, deltas, weights)  # private tensors (and single-architecture ones)
    info = {"tensors": 0, "pairs": 0, "conflicts": 0, "resolved": 0, "mean_cosine": None}
    cosines: list[float] = []
    shared = sorted({k for d in deltas for k in d if SEPARATOR not in k})
    for key in shared:
        means: dict[str, torch.Tensor] = {}
        totals: dict[str, float] = {}
        for arch in sorted(set(architectures)):
            held = [(d[key].float(), w) for d, w, a in zip(deltas, weights, architectures) if a == arch and key in d]
            total = sum(w for _, w in held)
            if held and total > 0:
                means[arch] = sum(v * w for v, w in held) / total
                totals[arch] = total
        if len(means) < 2:
            continue
        info["tensors"] += 1
        aligned = {}
        for arch, g in means.items():
            out = g.clone()
            for other, h in means.items():
                if other == arch:
                    continue
                norm2 = float((h * h).sum())
                if norm2 == 0.0:
                    continue
                if arch < other:  # each unordered pair is counted once
                    info["pairs"] += 1
                    cosine = float((g * h).sum()) / max((float((g * g).sum()) * norm2) ** 0.5, 1e-30)
                    cosines.append(cosine)
                    info["conflicts"] += int(cosine < 0)
                dot = float((out * h).sum())
                if dot < 0:
                    out = out - (dot / norm2) * h
                    info["resolved"] += 1
            aligned[arch] = out
        total = sum(totals.values())
        update = sum(aligned[a] * totals[a] for a in aligned) / total
        new_state[key] = (global_state[key].float() + update).to(global_state[key].dtype)
    info["mean_cosine"] = float(sum(cosines) / len(cosines)) if cosines else None
    return new_state, info


def trainable_parameters(state: Mapping[str, torch.Tensor], architecture: str) -> dict[str, int]:
    """Trainable parameters of one architecture's whole model: private, shared and in all."""
    private = sum(v.numel() for k, v in state.items() if k.startswith(architecture + SEPARATOR))
    shared = sum(v.numel() for k, v in state.items() if SEPARATOR not in k)
    return {"private": private, "shared": shared, "total": private + shared}
