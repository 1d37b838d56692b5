"""The built-in backbones: small 12-block ViTs pretrained here, on synthetic shapes.

The embedded default must run offline, so its backbone cannot come from a hub. This
module pretrains one once, on a synthetic shapes-and-textures task that shares no
digits and no labels with the tuning benchmark (its photo backgrounds and textures
are crops of the same two scikit-learn sample photos as the benchmark's ``texture``
domain's backgrounds), and writes it as a backbone cache. Only the server (or
``python -m fedra_core.pretrain``) builds it; clients only read.

Two recipes for the 12-block, 64-wide ViT, the same data, model and budget:

- ``digits-vit`` runs half of its batches through a random sub-model (a depth drawn
  uniformly from 1..12, then that many random blocks in order), the other half
  through all blocks. A small ViT trained without it depends on every block (with
  the first version of this recipe, tuned sub-models that skipped block 0 lost much
  of their accuracy: ``python -m fedra_core.probe`` shows it, and docs/RESULTS.md
  gives the figures). Its blocks are then more robust to being skipped than a real
  ViT's, which favours methods that train random sub-models, FedRA above all.
- ``digits-vit-sd`` is pretrained as real ViTs are (ViT-B/16 with DeiT's or
  AugReg's recipe): stochastic depth (``drop_path_rate`` 0.1, rising linearly over
  the blocks as in timm) and never a random sub-model. It is the fair backbone for
  comparing FedRA with the depth-based baselines. Stochastic depth acts during
  pretraining only; the cache records the plain architecture, so tuning runs
  without it, as with the other recipe.

HeteroTune's benchmark mixes architectures: ``digits-vit-s`` (32 wide, 8 blocks),
``digits-vit`` (64 wide, 12 blocks) and ``digits-vit-l`` (96 wide, 12 blocks), all
pretrained with ``digits-vit``'s recipe (random sub-models half of the time).

The cache records a digest of the recipe, so a cache built by another version is
rebuilt, not silently reused; a cache that holds other weights (an exported timm
backbone) is never overwritten.
"""

import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedra_core.backbone import BackboneCacheError, CacheMeta, import_timm, read_meta, write_cache

logger = logging.getLogger(__name__)

_DIGITS_VIT: dict[str, Any] = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 24, "patch_size": 4, "embed_dim": 64, "depth": 12,
               "num_heads": 4, "mlp_ratio": 2.0},
    "num_images": 16000,
    "epochs": 4,
    "batch_size": 128,
    "lr": 2e-3,
}

# A recipe's keys beside timm's: ``random_depth`` is the share of batches run through
# a random sub-model, ``drop_path_rate`` the stochastic depth of pretraining only
# (neither is stored in the cache's kwargs). Editing a recipe changes its digest.
RECIPES: dict[str, dict[str, Any]] = {
    "digits-vit": {**_DIGITS_VIT, "random_depth": 0.5},
    "digits-vit-sd": {**_DIGITS_VIT, "drop_path_rate": 0.1},
    # HeteroTune's family: the same recipe as digits-vit at other widths and depths, so a
    # federation can mix a narrow shallow model (a phone's), digits-vit and a wider one.
    "digits-vit-s": {**_DIGITS_VIT, "random_depth": 0.5,
                     "kwargs": {**_DIGITS_VIT["kwargs"], "embed_dim": 32, "depth": 8, "num_heads": 2}},
    "digits-vit-l": {**_DIGITS_VIT, "random_depth": 0.5,
                     "kwargs": {**_DIGITS_VIT["kwargs"], "embed_dim": 96, "depth": 12, "num_heads": 4}},
}


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _shapes(recipe: dict[str, Any], seed: int) -> tuple[Any, int]:
    from fedra_core.data import synthetic_shapes

    result = synthetic_shapes(recipe["num_images"], image_size=recipe["kwargs"]["img_size"], seed=seed)
    dataset, classes = result if isinstance(result, tuple) else (result, result.classes)
    return dataset, len(classes)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Style jitter for pretraining: polarity, per-channel gain and sensor noise.

    Images are normalized to about [-1, 1], so negation inverts polarity. Styles the
    tuning data may show (dark on light, coloured, noisy) then look familiar to the
    backbone without it ever seeing that data.
    """
    n = images.shape[0]  # images: (B, 3, H, W)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).view(n, 1, 1, 1)
    gain = 0.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=generator)
    noisy = (torch.rand(n, generator=generator) < 0.4).float().view(n, 1, 1, 1)
    sigma = 0.7 * torch.rand(n, 1, 1, 1, generator=generator) * noisy
    noise = torch.randn(images.shape, generator=generator) * sigma
    return (images * sign * gain + noise).clamp(-2.0, 2.0)


def random_blocks(num_layers: int, generator: torch.Generator) -> list[int]:
    """A random sub-model's blocks: a depth drawn uniformly from 1..L, then that many blocks."""
    depth = int(torch.randint(1, num_layers + 1, (1,), generator=generator))
    return sorted(torch.randperm(num_layers, generator=generator)[:depth].tolist())


def forward_blocks(model: nn.Module, images: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """Logits of the model run through ``blocks`` only, in order (the others skipped)."""
    full = model.blocks
    model.blocks = nn.Sequential(*[full[i] for i in blocks])
    try:
        return model(images)
    finally:
        model.blocks = full


def pretrain(recipe_name: str, seed: int = 0, threads: int | None = None) -> nn.Module:
    """Pretrain the recipe's ViT on synthetic shapes (all weights, AdamW, cosine)."""
    recipe = RECIPES[recipe_name]
    timm = import_timm()
    dataset, num_classes = _shapes(recipe, seed)
    if threads:
        torch.set_num_threads(threads)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(recipe["timm_name"], num_classes=num_classes,
                                  drop_path_rate=recipe.get("drop_path_rate", 0.0), **recipe["kwargs"])
        loader = DataLoader(dataset, batch_size=recipe["batch_size"], shuffle=True, drop_last=True)
        total = recipe["epochs"] * len(loader)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total)))
        model.train()
        start, step = time.perf_counter(), 0
        generator = torch.Generator().manual_seed(seed)
        for epoch in range(recipe["epochs"]):
            correct, seen = 0, 0
            for images, labels in loader:
                images = augment(images, generator)
                if torch.rand(1, generator=generator).item() < recipe.get("random_depth", 0.0):
                    logits = forward_blocks(model, images, random_blocks(len(model.blocks), generator))
                else:
                    logits = model(images)
                loss = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                correct += int((logits.argmax(1) == labels).sum())
                seen += labels.numel()
                step += 1
            logger.info("pretraining %s: epoch %d/%d, accuracy %.3f, %.0f s", recipe_name, epoch + 1,
                        recipe["epochs"], correct / seen, time.perf_counter() - start)
    return model.eval()


def recipe_source(recipe_name: str, seed: int) -> str:
    """The ``source`` a cache built from the recipe records: name, seed and a recipe digest.

    Any change to a recipe changes its digest, so a cache built by an older version
    of the recipe is recognised and rebuilt instead of silently reused.
    """
    digest = hashlib.sha256(json.dumps(RECIPES[recipe_name], sort_keys=True).encode()).hexdigest()[:12]
    return f"builtin:{recipe_name}:seed={seed}:recipe={digest}"


def _current_meta(cache_dir: Path, source: str) -> CacheMeta | None:
    """The cache's metadata if it holds this exact recipe's backbone, else None."""
    try:
        meta = read_meta(cache_dir)
    except BackboneCacheError:
        return None
    return meta if meta.source == source else None


def ensure_builtin_backbone(cache_dir: Path, recipe_name: str, seed: int = 0) -> CacheMeta:
    """Return the cache's metadata, pretraining and writing it first if it is missing or stale.

    Concurrent callers wait on a lock beside the cache, so only one pretrains; the
    cache directory itself appears atomically (see ``write_cache``). A cache built by
    another version of the recipe (or another seed) is replaced.
    """
    if recipe_name not in RECIPES:
        raise BackboneCacheError(f"unknown builtin backbone {recipe_name!r}; known: {sorted(RECIPES)}")
    cache_dir = Path(cache_dir).expanduser()
    source = recipe_source(recipe_name, seed)
    if (meta := _current_meta(cache_dir, source)) is not None:
        return meta
    with _file_lock(cache_dir.parent / f".{cache_dir.name}.lock"):
        if (meta := _current_meta(cache_dir, source)) is not None:
            return meta
        stale = (cache_dir / "meta.json").is_file()
        if stale:
            held = read_meta(cache_dir).source
            if held and not held.startswith(f"builtin:{recipe_name}:"):
                raise BackboneCacheError(
                    f"{cache_dir} holds another backbone ({held}), not the builtin {recipe_name!r}; "
                    "point backbone.cache elsewhere or set backbone.builtin to null to use it")
        logger.info("%s the builtin backbone %s into %s (once)",
                    "rebuilding (the cache there is from another recipe version)" if stale else "building",
                    recipe_name, cache_dir)
        recipe = RECIPES[recipe_name]
        model = pretrain(recipe_name, seed)
        return write_cache(model, recipe["timm_name"], recipe["kwargs"], cache_dir, source=source, replace=True)


def main() -> None:
    """Command line: ``python -m fedra_core.pretrain CACHE_DIR [--recipe digits-vit]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Build a builtin backbone cache.")
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--recipe", default="digits-vit", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    meta = ensure_builtin_backbone(args.cache_dir, args.recipe, args.seed)
    print(f"{args.cache_dir}: {meta.timm_name}, {meta.num_layers} blocks")


if __name__ == "__main__":
    main()
