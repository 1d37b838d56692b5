"""Head calibration: the global model's head refit in closed form to its own features.

A FedRA client trains its adapters and the head inside a sub-model, so the averaged
head was fitted to the features of many different sub-models and to none of them the
full model computes. The full model's features are good (a head refit on them gains
10-14 points on ``bench-extreme-4.yaml``, docs/RESULTS.md) but no client can train on
them, since none holds every block.

Calibration needs no training at all. Each node runs the global model (streamed block by
block from its cache when it cannot hold it, ``fedra_core.streaming``) over its own
training images and sends three sums of the head's input features ``x`` (``d`` floats):

    gram   = sum x x^T          (d, d)
    sums   = sum over class c   (C, d)
    counts = images per class   (C,)

The server adds them up and sets the head to the linear discriminant of the pooled
features (shared within-class covariance, shrunk towards a multiple of the identity by
the Oracle Approximating Shrinkage of Chen et al., 2010, which needs only the
covariance): exactly the head it would fit with every node's features in one place, from
one message per node. The sums reveal class-wise feature means (as prototype methods
do), no image and no gradient.

Every reply is checked before it counts: shapes, finite values, whole non-negative
counts within the node's declared examples, a symmetric ``gram``, and the within-class
scatter ``gram - sum_c sums_c sums_c^T / counts_c`` positive semi-definite, which any
real set of features satisfies.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

GRAM, SUMS, COUNTS = "calibration.gram", "calibration.sums", "calibration.counts"
STAT_KEYS = (GRAM, SUMS, COUNTS)
TOLERANCE = 1e-4  # relative: float32 sums of a few thousand features stay far inside it


class CalibrationError(ValueError):
    """Statistics that cannot be real features' sums, or a head that cannot be calibrated."""


@dataclass(frozen=True)
class FeatureStats:
    """One node's (or the pooled) feature sums, in float64."""

    gram: torch.Tensor  # (d, d)
    sums: torch.Tensor  # (C, d)
    counts: torch.Tensor  # (C,)

    @property
    def examples(self) -> int:
        return int(self.counts.sum())

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.gram + other.gram, self.sums + other.sums, self.counts + other.counts)

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """The three sums under their wire names, float32."""
        return {GRAM: self.gram.float(), SUMS: self.sums.float(), COUNTS: self.counts.float()}


def statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> FeatureStats:
    """Sums of features ``(N, d)`` with labels ``(N,)`` in ``0..num_classes-1``."""
    x = features.detach().to(torch.float64).cpu()
    onehot = torch.nn.functional.one_hot(labels.cpu().long(), num_classes).to(torch.float64)  # (N, C)
    return FeatureStats(x.T @ x, onehot.T @ x, onehot.sum(dim=0))


def check_statistics(arrays: Mapping[str, torch.Tensor], dim: int, num_classes: int,
                     max_examples: int) -> FeatureStats:
    """A node's reply as ``FeatureStats``, or ``CalibrationError`` naming what is wrong with it.

    Parameters
    ----------
    arrays : Mapping[str, Tensor]
        The reply's arrays: exactly ``STAT_KEYS``.
    dim : int
        Width of the head's input.
    num_classes : int
        Rows of the head.
    max_examples : int
        The most images the node can have counted (its declared training examples).
    """
    if set(arrays) != set(STAT_KEYS):
        raise CalibrationError(f"the statistics must be exactly {list(STAT_KEYS)}, got {sorted(arrays)[:5]}")
    expected = {GRAM: (dim, dim), SUMS: (num_classes, dim), COUNTS: (num_classes,)}
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != shape:
            raise CalibrationError(f"{key} has shape {tuple(arrays[key].shape)}, expected {shape}")
        if not torch.isfinite(arrays[key]).all():
            raise CalibrationError(f"{key} holds NaN or infinite values")
    gram, sums, counts = (arrays[k].to(torch.float64) for k in STAT_KEYS)
    if (counts < 0).any() or (counts != counts.round()).any():
        raise CalibrationError("the class counts must be whole numbers >= 0")
    if counts.sum() < 1 or counts.sum() > max_examples:
        raise CalibrationError(f"the counts add up to {int(counts.sum())} images; this node declared "
                               f"{max_examples} training examples")
    if (sums[counts == 0] != 0).any():
        raise CalibrationError("a class counted 0 times has a non-zero feature sum")
    scale = float(gram.diagonal().sum().abs()) + 1e-12
    if float((gram - gram.T).abs().max()) > TOLERANCE * scale:
        raise CalibrationError("the gram matrix is not symmetric")
    scatter = _within_scatter(FeatureStats(gram, sums, counts))
    lowest = float(torch.linalg.eigvalsh(scatter).min())
    if lowest < -TOLERANCE * scale:
        raise CalibrationError(f"the gram matrix and class sums are inconsistent (within-class scatter has an "
                               f"eigenvalue of {lowest:.3g}); no set of features has these sums")
    return FeatureStats(gram, sums, counts)


def _within_scatter(stats: FeatureStats) -> torch.Tensor:
    """``sum_i x_i x_i^T - sum_c n_c mu_c mu_c^T``: the features' scatter around their class means."""
    seen = stats.counts > 0
    means = stats.sums[seen] / stats.counts[seen, None]  # (C', d)
    return stats.gram - (means.T * stats.counts[seen]) @ means


def oas_shrinkage(covariance: torch.Tensor, examples: int) -> float:
    """The Oracle Approximating Shrinkage intensity (Chen et al., 2010) of a sample covariance of ``examples``."""
    p = covariance.shape[0]
    trace, trace_sq = float(covariance.trace()), float((covariance @ covariance).trace())
    denominator = (examples + 1 - 2 / p) * (trace_sq - trace ** 2 / p)
    if denominator <= 0:
        return 1.0  # already a multiple of the identity
    return min(1.0, ((1 - 2 / p) * trace_sq + trace ** 2) / denominator)


def discriminant_head(stats: FeatureStats, weight: torch.Tensor, bias: torch.Tensor,
                      shrinkage: float | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The linear discriminant of the pooled features as a head ``(weight, bias)``, and what was done.

    Classes no node counted keep their rows of the current ``weight`` and ``bias``.
    ``shrinkage`` in [0, 1] is the share of the identity in the covariance; ``None``
    chooses it by OAS.
    """
    seen = stats.counts > 0
    if int(seen.sum()) < 2:
        raise CalibrationError(f"the nodes counted images of {int(seen.sum())} class(es); a head needs two")
    if tuple(weight.shape) != (len(stats.counts), stats.gram.shape[0]):
        raise CalibrationError(f"the head is {tuple(weight.shape)}, the statistics "
                               f"{(len(stats.counts), stats.gram.shape[0])}")
    n = stats.examples
    covariance = _within_scatter(stats) / n
    p = covariance.shape[0]
    rho = oas_shrinkage(covariance, n) if shrinkage is None else float(shrinkage)
    if not 0 <= rho <= 1:
        raise CalibrationError(f"shrinkage {rho} is outside [0, 1]")
    level = float(covariance.trace()) / p
    if level <= 0:
        raise CalibrationError("the features do not vary within classes: nothing to calibrate on")
    shrunk = (1 - rho) * covariance + rho * level * torch.eye(p, dtype=covariance.dtype)
    means = stats.sums[seen] / stats.counts[seen, None]  # (C', d)
    try:
        rows = torch.linalg.solve(shrunk, means.T).T  # (C', d): Sigma^-1 mu_c
    except RuntimeError as err:  # torch.linalg.LinAlgError: a singular covariance without shrinkage
        raise CalibrationError(f"the shrunk covariance is singular (shrinkage {rho}); "
                               "leave strategy.calibration_shrinkage null or raise it") from err
    offsets = -0.5 * (rows * means).sum(dim=1) + torch.log(stats.counts[seen] / n)
    new_weight, new_bias = weight.detach().clone(), bias.detach().clone()
    new_weight[seen] = rows.to(weight.dtype)
    new_bias[seen] = offsets.to(bias.dtype)
    info = {"examples": n, "classes": int(seen.sum()), "shrinkage": round(rho, 6)}
    return new_weight, new_bias, info


def head_features(model: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input features ``(N, d)`` and labels ``(N,)`` of an in-memory model over a dataset."""
    from fedra_core.training import autocast

    model.eval()
    device = torch.device(device)
    features, labels = [], []
    with torch.no_grad():
        for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            with autocast(device, precision):
                x = model.forward_head(model.forward_features(images.to(device)), pre_logits=True)
            features.append(x.float().cpu())
            labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels)


def head_keys(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The global names of the head's weight and bias in a state; ``CalibrationError`` if it has no plain head."""
    if "head.weight" not in state or "head.bias" not in state or state["head.weight"].dim() != 2:
        raise CalibrationError("the global state has no linear head (head.weight, head.bias) to calibrate")
    return "head.weight", "head.bias"


def calibrate_state(state: Mapping[str, torch.Tensor], replies: Sequence[FeatureStats],
                    shrinkage: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state`` with its head set to the discriminant of the nodes' pooled statistics; what was done."""
    if not replies:
        raise CalibrationError("no node sent statistics")
    pooled = replies[0]
    for stats in replies[1:]:
        pooled = pooled + stats
    weight_key, bias_key = head_keys(state)
    weight, bias, info = discriminant_head(pooled, state[weight_key], state[bias_key], shrinkage)
    return {**state, weight_key: weight, bias_key: bias}, {**info, "nodes": len(replies)}
