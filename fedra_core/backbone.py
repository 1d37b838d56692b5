"""Backbone cache: a timm model written once as safetensors, read block by block.

A cache directory holds ``meta.json`` (timm name, construction arguments, depth,
normalization) and ``backbone.safetensors`` (every weight but the classifier). A
client assembles a shallow sub-model from it by reading only the tensors that
sub-model needs: the shared parts (embedding, final norm) and the blocks it holds.
The blocks keep their *global* index as their name inside ``model.blocks``, so the
sub-model's own ``state_dict()`` already carries names like ``blocks.7.attn.proj``.
"""

import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fedra_core._compat import ensure_torchvision_importable

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
WEIGHTS_FILE = "backbone.safetensors"
BLOCK_PREFIX = "blocks."


class BackboneCacheError(RuntimeError):
    """The backbone cache is missing, incomplete or does not fit the request."""


@dataclass(frozen=True)
class CacheMeta:
    """What a cache directory says about its backbone."""

    timm_name: str
    kwargs: dict[str, Any]
    num_layers: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str = ""  # how the weights were made, e.g. a builtin recipe's fingerprint


@dataclass(frozen=True)
class AssemblyStats:
    """What an assembly read from disk."""

    tensors_read: int
    bytes_read: int
    keys_read: tuple[str, ...]


def import_timm() -> Any:
    ensure_torchvision_importable()
    import timm

    return timm


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier (``get_classifier()``)."""
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return {f"{name}.{k}" for k in module.state_dict()}
    return set()


def _check_blocks(model: nn.Module, timm_name: str) -> int:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise BackboneCacheError(
            f"{timm_name}: FedRA needs a model whose transformer blocks are an "
            "nn.Sequential named 'blocks' (timm ViT, DeiT, MLP-Mixer); this one has none"
        )
    return len(blocks)


def write_cache(model: nn.Module, timm_name: str, kwargs: dict[str, Any], cache_dir: Path,
                source: str = "", replace: bool = False) -> CacheMeta:
    """Write ``model`` (built by ``timm.create_model(timm_name, **kwargs)``) to a cache.

    The directory appears atomically: everything is written to a temporary sibling
    that is then renamed, so a reader never sees a half-written cache. If another
    writer finished first, its cache is kept and this one is discarded.

    Parameters
    ----------
    model : nn.Module
        The backbone with its weights.
    timm_name : str
        The timm architecture name.
    kwargs : dict
        Arguments for ``timm.create_model`` (e.g. ``img_size``, ``depth``).
    cache_dir : Path
        Destination directory (must not exist yet, unless ``replace``).
    source : str
        How the weights were made, recorded in the metadata.
    replace : bool
        Swap out an existing cache at ``cache_dir`` (the caller holds a lock against
        other writers); readers see either the old or the new directory.

    Returns
    -------
    CacheMeta
        The metadata written.
    """
    num_layers = _check_blocks(model, timm_name)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    image_size = kwargs.get("img_size", cfg.get("input_size", (3, 224, 224))[-1])
    meta = CacheMeta(
        timm_name=timm_name,
        kwargs=dict(kwargs),
        num_layers=num_layers,
        image_size=int(image_size if isinstance(image_size, int) else image_size[-1]),
        mean=tuple(float(x) for x in cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(float(x) for x in cfg.get("std", (0.5, 0.5, 0.5))),
        source=source,
    )
    skip = classifier_keys(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    cache_dir = Path(cache_dir)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta.__dict__, indent=2))
        stale = None
        if replace and cache_dir.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.stale.", dir=cache_dir.parent))
            os.rename(cache_dir, stale / cache_dir.name)
        os.rename(tmp, cache_dir)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache_dir / META_FILE).is_file():
            raise
        logger.info("backbone cache %s was written by another process; keeping it", cache_dir)
    logger.info("wrote backbone cache %s (%s, %d blocks)", cache_dir, timm_name, num_layers)
    return meta


def read_meta(cache_dir: Path) -> CacheMeta:
    """Read a cache's metadata, with a clear error when the cache is not there."""
    cache_dir = Path(cache_dir)
    meta_path, weights_path = cache_dir / META_FILE, cache_dir / WEIGHTS_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise BackboneCacheError(
            f"no backbone cache at {cache_dir} (expected {META_FILE} and {WEIGHTS_FILE}); "
            "create it with `python -m fedra_core.backbone export ...` or use a builtin backbone"
        )
    try:
        values = json.loads(meta_path.read_text())
        return CacheMeta(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})
    except (ValueError, TypeError, KeyError) as err:
        raise BackboneCacheError(f"{meta_path} is not a valid backbone cache description: {err}") from err


def _skeleton(meta: CacheMeta, num_classes: int) -> nn.Module:
    """The full architecture on the meta device: structure only, no memory, no init cost."""
    timm = import_timm()
    kwargs = {**meta.kwargs, "num_classes": num_classes, "pretrained": False}
    with torch.device("meta"):
        return timm.create_model(meta.timm_name, **kwargs)


def _keep_blocks(model: nn.Module, layers: Sequence[int]) -> None:
    """Replace ``model.blocks`` by the listed blocks, named by their global index."""
    model.blocks = nn.Sequential(OrderedDict((str(i), model.blocks[i]) for i in layers))


def _needed_keys(model: nn.Module, available: set[str], classifier: set[str]) -> list[str]:
    needed = [k for k in model.state_dict() if k not in classifier]
    missing = [k for k in needed if k not in available]
    if missing:
        raise BackboneCacheError(f"the backbone cache lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return needed


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate a block list: distinct global indices in 0..num_layers-1, ascending."""
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("a sub-model needs at least one block")
    if sorted(set(layers)) != layers:
        raise ValueError(f"layers must be distinct and ascending, got {layers}")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"layers {layers} are outside 0..{num_layers - 1}")
    return layers


def assemble(
    cache_dir: Path,
    layers: Sequence[int] | None,
    num_classes: int,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, AssemblyStats]:
    """Build a sub-model holding only ``layers`` from the cache, reading only its tensors.

    Parameters
    ----------
    cache_dir : Path
        The backbone cache.
    layers : Sequence[int] or None
        Global block indices, ascending; ``None`` for the full-depth model.
    num_classes : int
        Size of the new classifier head (freshly initialized; it is trained state).
    device : str or torch.device
        Where the tensors are loaded (``cpu``, ``cuda``, ``cuda:N``).

    Returns
    -------
    tuple[nn.Module, AssemblyStats]
        The sub-model in eval mode and what was read from disk.
    """
    meta = read_meta(cache_dir)
    layers = list(range(meta.num_layers)) if layers is None else check_layers(layers, meta.num_layers)
    model = _skeleton(meta, num_classes)
    _check_blocks(model, meta.timm_name)
    classifier = classifier_keys(model)
    _keep_blocks(model, layers)
    device = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(cache_dir) / WEIGHTS_FILE), framework="pt", device=str(device)) as f:
        keys = _needed_keys(model, set(f.keys()), classifier)
        for key in keys:
            tensors[key] = f.get_tensor(key)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.reset_classifier(num_classes)
    model.to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise BackboneCacheError(f"{meta.timm_name}: tensors not restored from the cache: {leftover[:5]}")
    stats = AssemblyStats(len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()),
                          tuple(keys))
    return model.eval(), stats


def export_timm(timm_name: str, cache_dir: Path, checkpoint: Path | None = None,
                pretrained: bool = False, **kwargs: Any) -> CacheMeta:
    """Create a cache from timm: pretrained weights (needs the hub) or a local checkpoint."""
    timm = import_timm()
    model = timm.create_model(timm_name, pretrained=pretrained and checkpoint is None, **kwargs)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in classifier_keys(model)]
        if missing or unexpected:
            raise BackboneCacheError(f"{checkpoint} does not fit {timm_name}: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
    source = f"checkpoint:{checkpoint}" if checkpoint is not None else (
        f"timm:{timm_name}" + (":pretrained" if pretrained else ":random-init"))
    return write_cache(model, timm_name, kwargs, cache_dir, source=source)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m fedra_core.backbone export NAME OUT [--checkpoint F]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedra_core.backbone",
                                     description="Write a timm backbone into a FedRA backbone cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="create a cache from timm weights or a checkpoint")
    export.add_argument("timm_name", help="e.g. vit_base_patch16_224.augreg_in21k")
    export.add_argument("out", type=Path, help="cache directory to create")
    export.add_argument("--checkpoint", type=Path, help="local state_dict file (.pth)")
    export.add_argument("--pretrained", action="store_true", help="download timm's weights")
    export.add_argument("--img-size", type=int, help="input resolution")
    args = parser.parse_args(argv)
    extra = {"img_size": args.img_size} if args.img_size else {}
    meta = export_timm(args.timm_name, args.out, args.checkpoint, args.pretrained, **extra)
    print(f"wrote {args.out}: {meta.timm_name}, {meta.num_layers} blocks, input {meta.image_size}px")


if __name__ == "__main__":
    main()
