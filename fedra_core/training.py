"""One local training loop shared by FedRA and every baseline, and evaluation."""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedra_core.config import TrainingConfig

logger = logging.getLogger(__name__)

# (model, images, labels) -> (logits, loss): the default is plain cross-entropy; a
# baseline that needs an extra loss term (DepthFL's distillation) passes its own.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    num_examples: int
    steps: int
    loss: float
    accuracy: float
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_examples / self.seconds if self.seconds > 0 else 0.0


def cross_entropy_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain classification loss."""
    logits = model(images)  # (B, num_classes)
    return logits, nn.functional.cross_entropy(logits, labels)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision context for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params: list[nn.Parameter], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batches(loader: DataLoader, steps: int | None, epochs: int) -> Iterator[tuple]:
    """Epochs over the loader, or exactly ``steps`` batches cycling through it."""
    if steps is None:
        for _ in range(epochs):
            yield from loader
        return
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train_local(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainingConfig,
    device: torch.device,
    loss_fn: LossFn = cross_entropy_loss,
) -> TrainResult:
    """Train the model's trainable parameters on ``loader``.

    Parameters
    ----------
    model : nn.Module
        The (sub-)model, already on ``device``; only parameters with
        ``requires_grad`` are optimized.
    loader : DataLoader
        Local training data.
    cfg : TrainingConfig
        Optimizer, learning rate, epochs or steps, clipping and precision
        (``fp16`` trains with a gradient scaler).
    device : torch.device
        Where batches are moved.
    loss_fn : LossFn
        Returns ``(logits, loss)`` for a batch.

    Returns
    -------
    TrainResult
        Examples seen, steps, mean loss and accuracy, seconds.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = make_optimizer(params, cfg)
    # fp16's small gradients underflow to zero unless the loss is scaled up first; bf16
    # has fp32's range and needs no scaler (disabled, the scaler passes everything through)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    model.train()
    seen, steps = 0, 0
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
    start = time.perf_counter()
    for images, labels in _batches(loader, cfg.local_steps, cfg.local_epochs):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, cfg.precision):
            logits, loss = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then halves
        scaler.update()
        seen += labels.shape[0]
        correct += (logits.argmax(dim=1) == labels).sum()
        loss_sum += loss.detach().float() * labels.shape[0]
        steps += 1
    mean_loss = float(loss_sum) / max(seen, 1)  # one sync, at the end
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"local training diverged: mean loss {mean_loss} over {steps} steps")
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(seen, steps, mean_loss, float(correct) / max(seen, 1), seconds)


# (model, images) -> logits of each of the model's classifiers, the head last (DepthFL's exits)
ClassifiersFn = Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on one test set."""

    loss: float
    accuracy: float  # of the model's own output (its deepest classifier)
    num_examples: int
    ensemble_accuracy: float | None = None  # of the mean logits of all its classifiers, when asked


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             classifiers: ClassifiersFn | None = None) -> EvalResult:
    """Mean loss and accuracy of ``model`` on ``loader``, in one pass.

    With ``classifiers`` (a model with several classifiers, DepthFL's), the accuracy
    is the last (deepest) classifier's, as FedRA's comparison scores DepthFL, and
    ``ensemble_accuracy`` that of the mean of every classifier's logits, as DepthFL's
    paper does.
    """
    model.eval()
    seen = 0
    # summed on the device and read once at the end: no host-device sync per batch
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    ensemble_correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            outputs = classifiers(model, images) if classifiers else [model(images)]  # each (B, C)
        logits = outputs[-1].float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
        if classifiers:
            ensemble = torch.stack([o.float() for o in outputs]).mean(dim=0)  # (B, C)
            ensemble_correct += (ensemble.argmax(dim=1) == labels).sum()
        seen += labels.numel()
    count = max(seen, 1)
    return EvalResult(float(loss_sum) / count, int(correct) / count, seen,
                      int(ensemble_correct) / count if classifiers else None)
