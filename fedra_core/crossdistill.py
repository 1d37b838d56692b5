"""Cross-architecture distillation on the server: how HeteroTune's architectures learn each other's domains.

This is this project's design (HeteroTune publishes no code). Shared adapter parts alone
carry little across architectures (docs/RESULTS.md): what an architecture learns sits in
its private projections and head, trained only on its own clients' data. The one space
every architecture has in common is its output, so after each round's averaging the
server, which holds every architecture's global model, distills them into each other on
a set of unlabeled images that no client trains on (``data.proxy_fraction`` of every
domain's training split, its labels never read):

1. every architecture's global model predicts the proxy images (``p_a = softmax(z_a / T)``);
2. the teacher is the architectures' predictions weighted by each one's capacity
   (``distill_teacher: capacity``, the default: the width times the depth of its
   backbone, so a larger model, which generalizes better, counts more and keeps more of
   its own view), their plain mean (``mean``), or their mean weighted per image by each
   one's confidence (``confidence``: its top probability at temperature 1);
3. each architecture's private tensors (adapter projections, mixing weights, heads) take
   ``distill_steps`` AdamW steps on ``T^2 KL(teacher || student)`` over random batches
   of the proxy; the shared experts stay as the clients' average left them.

What the step did goes into the round's record: per architecture, the KL divergence to
the teacher and the share of proxy images where the student's top class is the
teacher's, before and after. The batches are drawn from the run's seed and the round,
so a resumed run repeats them.
"""

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fedra_core.config import StrategyConfig
from fedra_core.hetero import SEPARATOR
from fedra_core.lora import State

if TYPE_CHECKING:
    from fedra_core.evaluation import GlobalModel
    from fedra_core.methods import Method


class CrossDistiller:
    """The server's distillation step between architectures (see the module's docstring).

    Parameters
    ----------
    models : Mapping[str, GlobalModel]
        Every architecture's global model (the server's evaluation models).
    method : Method
        Slices an architecture's part of the global state (``sendable``).
    depths : Mapping[str, int]
        Every architecture's depth.
    proxy : Mapping[str, Dataset]
        Per architecture, the proxy images normalized as its backbone reads them, the
        same images in the same order for every architecture (labels are ignored).
    settings : StrategyConfig
        ``distill_steps``, ``distill_batch_size``, ``distill_lr``, ``distill_temperature``
        and ``distill_teacher``.
    seed : int
        The run's seed (with the round, it draws the batches).
    batch_size : int
        Batch size of the prediction passes over the proxy.
    capacities : Mapping[str, float], optional
        Every architecture's capacity (``distill_teacher: capacity``): width times depth.
    """

    def __init__(self, models: Mapping[str, "GlobalModel"], method: "Method", depths: Mapping[str, int],
                 proxy: Mapping[str, Dataset], settings: StrategyConfig, seed: int, batch_size: int = 512,
                 capacities: Mapping[str, float] | None = None) -> None:
        if len(models) < 2:
            raise ValueError("cross-architecture distillation needs two architectures or more")
        sizes = {name: len(proxy[name]) for name in models}
        if len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
            raise ValueError(f"the proxy sets must hold the same images for every architecture, got sizes {sizes}")
        self.models, self.method, self.depths = dict(models), method, dict(depths)
        self.proxy, self.settings = dict(proxy), settings
        self.seed, self.batch_size = seed, batch_size
        self.size = next(iter(sizes.values()))
        if settings.distill_teacher == "capacity":
            if capacities is None or set(capacities) != set(models) or min(capacities.values()) <= 0:
                raise ValueError(f"distill_teacher 'capacity' needs a positive capacity per architecture, "
                                 f"got {capacities}")
        self.capacities = dict(capacities or {})

    def _own(self, state: Mapping[str, torch.Tensor], name: str) -> State:
        depth = self.depths[name]
        return self.method.sendable(state, range(depth), name, depth)

    @torch.no_grad()
    def _predict(self, name: str) -> torch.Tensor:
        """The loaded model's logits on every proxy image, on the CPU."""
        model = self.models[name]
        model.model.eval()
        loader = DataLoader(self.proxy[name], batch_size=self.batch_size, shuffle=False)
        return torch.cat([model.model(images.to(model.device)).float().cpu() for images, _ in loader])

    def teacher(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's probabilities (N, C) from every architecture's logits."""
        temperature = self.settings.distill_temperature
        probs = torch.stack([F.softmax(z / temperature, dim=-1) for z in logits.values()])  # (A, N, C)
        if self.settings.distill_teacher == "mean":
            return probs.mean(dim=0)
        if self.settings.distill_teacher == "capacity":
            weights = torch.tensor([float(self.capacities[name]) for name in logits])
            return (probs * (weights / weights.sum()).view(-1, 1, 1)).sum(dim=0)
        confidence = torch.stack([F.softmax(z, dim=-1).amax(dim=-1) for z in logits.values()])  # (A, N)
        weights = confidence / confidence.sum(dim=0, keepdim=True)
        return (probs * weights.unsqueeze(-1)).sum(dim=0)

    def _fit(self, name: str, target: torch.Tensor, server_round: int) -> None:
        """``distill_steps`` steps of the loaded model's private tensors towards ``target``."""
        cfg, model = self.settings, self.models[name]
        params = [p for n, p in model.model.named_parameters() if p.requires_grad and not n.startswith("dema.")]
        optimizer = torch.optim.AdamW(params, lr=cfg.distill_lr, weight_decay=0.0)
        frozen = [p for n, p in model.model.named_parameters() if p.requires_grad and n.startswith("dema.")]
        for p in frozen:
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)
        model.model.train()
        try:
            for _ in range(cfg.distill_steps):
                index = torch.randint(0, self.size, (min(cfg.distill_batch_size, self.size),), generator=generator)
                images = torch.stack([self.proxy[name][int(i)][0] for i in index]).to(model.device)
                log_student = F.log_softmax(model.model(images).float() / cfg.distill_temperature, dim=-1)
                loss = F.kl_div(log_student, target[index].to(model.device), reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                (loss * cfg.distill_temperature ** 2).backward()
                optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.model.eval()

    def _fidelity(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """KL divergence to the teacher and top-class agreement with it, over the proxy."""
        log_student = F.log_softmax(logits / self.settings.distill_temperature, dim=-1)
        kl = F.kl_div(log_student, target, reduction="batchmean") * self.settings.distill_temperature ** 2
        agreement = (logits.argmax(dim=-1) == target.argmax(dim=-1)).float().mean()
        return {"kl": round(float(kl), 5), "agreement": round(float(agreement), 4)}

    def __call__(self, state: Mapping[str, torch.Tensor], server_round: int) -> tuple[State, dict[str, Any]]:
        """The global state after the distillation step (inputs unchanged), and what it did."""
        started = time.perf_counter()
        logits = {}
        for name, model in self.models.items():
            model.load(self._own(state, name))
            logits[name] = self._predict(name)
        target = self.teacher(logits)
        new_state = dict(state)
        info: dict[str, Any] = {"steps": self.settings.distill_steps, "proxy_images": self.size,
                                "teacher": self.settings.distill_teacher, "architectures": {}}
        for name, model in self.models.items():
            before = self._fidelity(logits[name], target)
            model.load(self._own(state, name))
            self._fit(name, target, server_round)
            tuned = self.method.trainable_state(model.model, name)
            new_state.update({k: v.to(state[k].device, state[k].dtype) for k, v in tuned.items()
                              if SEPARATOR in k and k in state})
            after = self._fidelity(self._predict(name), target)
            info["architectures"][name] = {"before": before, "after": after}
        info["seconds"] = round(time.perf_counter() - started, 2)
        return new_state, info
