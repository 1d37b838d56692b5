"""Block surrogates: a tiny module per block that stands in for it where a client skips it.

A FedRA client trains inside a sub-model where the skipped blocks are simply absent, so
its features differ from the full model's. A surrogate approximates one frozen block's
function at a few percent of its size::

    s_i(x) = x + up_i(gelu(h + mix_i(mean_tokens(h)))),   h = down_i(LN_i(x))   # x: (B, N, C)

(a residual low-rank MLP; ``mix`` lets the tokens' mean carry a little of attention's
mixing). ``up`` starts at zero, so an untrained surrogate is the plain skip. The server
distills every block's surrogate at once from the backbone alone: the full model runs
proxy images (the builtin backbone's synthetic pretraining shapes, or a folder of
unlabeled images), and each surrogate learns, by MSE, the output of its block from that
block's real input. Never client data.

The surrogates of a cache live beside its weights, ``<cache>/surrogates.safetensors``,
under names ``surrogates.<i>.…`` (global block index), written atomically, with the
recipe's digest and the backbone's identity in the file's metadata: a file from another
recipe, rank or backbone is rebuilt by ``ensure_surrogates`` (the server) and refused by
``load_surrogates`` (a node), which reads only the tensors of the blocks it skips.

``python -m fedra_core.surrogates build CACHE [--rank 8] [--proxy-images DIR]`` builds
them for any cache.
"""

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from fedra_core.backbone import WEIGHTS_FILE, CacheMeta, assemble, read_meta

logger = logging.getLogger(__name__)

SURROGATES_FILE = "surrogates.safetensors"
PREFIX = "surrogates."  # the tensors' names, in the file, on the wire and in a sub-model
MODES = ("frozen", "redistill", "tuned")
_FORMAT = 1  # bump when the module or the distillation changes: every file is then rebuilt


class SurrogateError(RuntimeError):
    """The surrogates are missing, stale or do not fit the request; the message says what to do."""


@dataclass(frozen=True)
class Recipe:
    """How a cache's surrogates are distilled; any change gives another digest, hence a rebuild."""

    rank: int = 8  # width of the low-rank MLP
    images: int = 2048  # proxy images per epoch
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    proxy: str = "shapes"  # "shapes" (synthetic, the builtin pretraining data) or a folder of images

    def __post_init__(self) -> None:
        for key in ("rank", "images", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"surrogate recipe: {key} = {getattr(self, key)} must be >= 1")


class Surrogate(nn.Module):
    """A residual low-rank MLP over tokens standing in for one transformer block."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, rank)
        self.mix = nn.Linear(rank, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)  # untrained: the plain skip
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.mix.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.norm(x))  # (B, N, r)
        h = h + self.mix(h.mean(dim=1, keepdim=True))  # the tokens' mean: a little of attention's mixing
        return x + self.up(F.gelu(h))  # (B, N, C)


def surrogate_set(dim: int, rank: int, layers: Sequence[int]) -> nn.ModuleDict:
    """Fresh surrogates (the plain skip) for ``layers``, keyed by the global index."""
    return nn.ModuleDict({str(i): Surrogate(dim, rank) for i in layers})


class BlocksWithSurrogates(nn.Sequential):
    """The held blocks (children, named by global index) run in depth order with the skipped ones' surrogates.

    Only the held blocks are children, so ``blocks.7.attn.proj…`` names and
    ``len(model.blocks)`` are those of the plain sub-model; the surrogates are the
    model's ``surrogates.<i>`` and only referenced here.
    """

    def __init__(self, blocks: nn.Sequential, order: Sequence[nn.Module]) -> None:
        super().__init__(OrderedDict(blocks.named_children()))
        self.__dict__["depth_order"] = list(order)  # not registered: no second name for a surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.depth_order:
            x = module(x)
        return x


def insert_surrogates(model: nn.Module, surrogates: nn.ModuleDict, num_layers: int) -> nn.Module:
    """Put ``surrogates`` (keyed by global index) in the skipped positions of an assembled sub-model.

    The surrogates are frozen: they are no trainable state of any method here.
    """
    held = {int(name): block for name, block in model.blocks.named_children()}
    skipped = [i for i in range(num_layers) if i not in held]
    if sorted(int(k) for k in surrogates) != skipped:
        raise SurrogateError(f"surrogates for blocks {sorted(int(k) for k in surrogates)} do not fill the "
                             f"skipped positions {skipped}")
    for param in surrogates.parameters():
        param.requires_grad_(False)
    model.surrogates = surrogates
    order = [held[i] if i in held else surrogates[str(i)] for i in range(num_layers)]
    model.blocks = BlocksWithSurrogates(model.blocks, order)
    return model


# ---------------------------------------------------------------- state and file
def to_state(surrogates: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The surrogates' tensors under their global names ``surrogates.<i>.…``."""
    return {PREFIX + k: v.detach().cpu().clone() for k, v in surrogates.state_dict().items()}


def from_state(state: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> nn.ModuleDict:
    """Surrogates from ``surrogates.<i>.…`` tensors; every surrogate must be complete."""
    by_block: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(PREFIX):
            raise SurrogateError(f"{key} is no surrogate tensor (expected {PREFIX}<block>.…)")
        index, _, name = key[len(PREFIX):].partition(".")
        if not index.isdigit():
            raise SurrogateError(f"{key}: no block index after {PREFIX!r}")
        by_block.setdefault(index, {})[name] = value
    modules = nn.ModuleDict()
    for index, tensors in sorted(by_block.items(), key=lambda kv: int(kv[0])):
        if "down.weight" not in tensors:
            raise SurrogateError(f"the surrogate of block {index} lacks down.weight")
        rank, dim = tensors["down.weight"].shape
        module = Surrogate(dim, rank)
        try:
            module.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise SurrogateError(f"the surrogate of block {index} does not fit: {err}") from err
        modules[index] = module.to(device)
    return modules


def backbone_identity(cache_dir: Path, meta: CacheMeta | None = None) -> str:
    """What the backbone's weights are: the cache's recorded source, else a digest of its weights file."""
    meta = meta or read_meta(cache_dir)
    if meta.source:
        return meta.source
    digest = hashlib.sha256()
    with open(Path(cache_dir) / WEIGHTS_FILE, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:16]}"


def _proxy_identity(proxy: str) -> str:
    """The proxy as the digest sees it: ``shapes``, or a folder with a digest of its file list and sizes."""
    if proxy == "shapes":
        return proxy
    files = sorted(_image_files(Path(proxy)))
    listing = "\n".join(f"{p.relative_to(proxy)}:{p.stat().st_size}" for p in files)
    return f"folder:{hashlib.sha256(listing.encode()).hexdigest()[:12]}"


def surrogate_source(recipe: Recipe, identity: str) -> str:
    """The ``source`` a surrogate file records: its rank and a digest of recipe, proxy and backbone."""
    text = json.dumps({**asdict(recipe), "proxy": _proxy_identity(recipe.proxy), "backbone": identity,
                       "format": _FORMAT}, sort_keys=True)
    return f"surrogates:rank={recipe.rank}:recipe={hashlib.sha256(text.encode()).hexdigest()[:12]}"


def read_info(cache_dir: Path) -> dict[str, str] | None:
    """The surrogate file's metadata, or None when the cache has none."""
    path = Path(cache_dir) / SURROGATES_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_surrogates(cache_dir: Path, state: Mapping[str, torch.Tensor], info: Mapping[str, str]) -> Path:
    """Write the file atomically beside the cache's weights: a reader sees the old file or the new one."""
    path = Path(cache_dir) / SURROGATES_FILE
    handle, tmp = tempfile.mkstemp(prefix=f".{SURROGATES_FILE}.", dir=cache_dir)
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=dict(info))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_surrogates(cache_dir: Path, layers: Sequence[int], rank: int, device: str | torch.device = "cpu"
                    ) -> tuple[nn.ModuleDict, int]:
    """The surrogates of ``layers`` from the cache's file, reading only their tensors.

    Parameters
    ----------
    cache_dir : Path
        The backbone cache holding ``surrogates.safetensors``.
    layers : Sequence[int]
        Global indices of the blocks to stand in for (a client's skipped blocks).
    rank : int
        The experiment's ``strategy.surrogates_rank``; a file of another rank is refused.
    device : str or torch.device
        Where the tensors are loaded.

    Returns
    -------
    tuple[nn.ModuleDict, int]
        The surrogates keyed by global index, and the bytes read.
    """
    cache_dir = Path(cache_dir)
    info = read_info(cache_dir)
    build = f"the server builds it, or run `python -m fedra_core.surrogates build {cache_dir} --rank {rank}`"
    if info is None:
        raise SurrogateError(f"{cache_dir} holds no {SURROGATES_FILE}; {build}")
    identity = backbone_identity(cache_dir)
    if info.get("backbone") != identity or info.get("rank") != str(rank):
        raise SurrogateError(f"{cache_dir / SURROGATES_FILE} was distilled for backbone {info.get('backbone')!r} "
                             f"at rank {info.get('rank')}; this cache holds {identity!r} and the run asks rank "
                             f"{rank}; {build}")
    wanted = {str(i) for i in layers}
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(cache_dir / SURROGATES_FILE), framework="pt", device=str(torch.device(device))) as f:
        for key in f.keys():
            if key[len(PREFIX):].split(".", 1)[0] in wanted:
                tensors[key] = f.get_tensor(key)
    modules = from_state(tensors, device)
    missing = sorted(wanted - set(modules.keys()), key=int)
    if missing:
        raise SurrogateError(f"{cache_dir / SURROGATES_FILE} has no surrogate for blocks {missing}; {build}")
    return modules, sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- proxy data
def _image_files(folder: Path) -> Iterator[Path]:
    from fedra_core.data.folders import IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise SurrogateError(f"proxy images: {folder} is not a folder")
    return (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def proxy_images(recipe: Recipe, meta: CacheMeta) -> Dataset:
    """The server's proxy images, normalized as the backbone expects; never any client's data.

    ``shapes``: the builtin pretraining task's synthetic shapes (drawn in [-1, 1], then
    renormalized with the cache's mean and std); otherwise every image under the folder.
    """
    if recipe.proxy != "shapes":
        from fedra_core.data.folders import ImageFileDataset

        files = sorted(_image_files(Path(recipe.proxy)))
        if not files:
            raise SurrogateError(f"proxy images: {recipe.proxy} holds no image files")
        return ImageFileDataset(files, [0] * len(files), meta.image_size, meta.mean, meta.std, train=True,
                                generator=torch.Generator().manual_seed(recipe.seed))
    from fedra_core.data import synthetic_shapes

    shapes = synthetic_shapes(recipe.images, image_size=meta.image_size, seed=10_000 + recipe.seed)
    pixels = shapes.tensors[0] * 0.5 + 0.5  # (N, 3, S, S) in [0, 1]: drawn with mean 0.5 and std 0.5
    mean, std = torch.tensor(meta.mean).view(1, 3, 1, 1), torch.tensor(meta.std).view(1, 3, 1, 1)
    return torch.utils.data.TensorDataset((pixels - mean) / std)


# ---------------------------------------------------------------- distillation
def block_io(model: nn.Module, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every block's (input, output) tokens when the full model runs ``images``: one forward pass."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [block.register_forward_hook(lambda _m, args, out: pairs.append((args[0].detach(), out.detach())))
             for block in model.blocks]
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _relative_errors(surrogates: nn.ModuleDict, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
                     ) -> list[torch.Tensor]:
    """Per block: ||s(x) - y||^2 / ||x - y||^2, 1 for the plain skip, 0 for the block itself."""
    return [F.mse_loss(surrogates[str(i)](x), y) / F.mse_loss(x, y).clamp_min(1e-12)
            for i, (x, y) in enumerate(pairs)]


def chain_errors(teacher: nn.Module, surrogates: nn.ModuleDict, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 held: Sequence[int]) -> list[torch.Tensor]:
    """Per position of a sub-model holding ``held``: how far its tokens drift from the full model's.

    The sub-model runs the held blocks and the other positions' surrogates from the
    first block's input, as a client's does; each position's error is relative to that
    block's own change, as in ``_relative_errors``.
    """
    x = pairs[0][0]
    errors = []
    for i, (block_in, block_out) in enumerate(pairs):
        x = teacher.blocks[i](x) if i in held else surrogates[str(i)](x)
        errors.append(F.mse_loss(x, block_out) / F.mse_loss(block_in, block_out).clamp_min(1e-12))
    return errors


def distill(teacher: nn.Module, surrogates: nn.ModuleDict, proxy: Dataset, recipe: Recipe,
            device: str | torch.device = "cpu", epochs: int | None = None) -> list[float]:
    """Fit every block's surrogate to the teacher's block on the proxy images (AdamW, cosine).

    Parameters
    ----------
    teacher : nn.Module
        The full model (all blocks, frozen; with adapters when re-distilling).
    surrogates : nn.ModuleDict
        One surrogate per block, keyed by global index; trained in place.
    proxy : Dataset
        Proxy images (first item of each sample).
    recipe : Recipe
        Batch size, learning rate, epochs and seed.
    device : str or torch.device
        Where the distillation runs.
    epochs : int, optional
        Passes over the proxy data instead of the recipe's (a warm re-distillation).

    Returns
    -------
    list[float]
        Each block's relative error on the last epoch (1: no better than skipping it).
    """
    from fedra_core.pretrain import augment, random_blocks

    teacher.eval().to(device)
    surrogates.train().to(device)
    for param in surrogates.parameters():
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(proxy, batch_size=recipe.batch_size, shuffle=True, drop_last=len(proxy) > recipe.batch_size,
                        generator=generator)
    epochs = epochs or recipe.epochs
    total = epochs * len(loader)
    optimizer = torch.optim.AdamW(surrogates.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    sums = torch.zeros(len(surrogates))
    for epoch in range(epochs):
        sums.zero_()
        for batch in loader:
            images = augment(batch[0], generator).to(device)  # the backbone's pretraining styles
            pairs = block_io(teacher, images)
            errors = _relative_errors(surrogates, pairs)
            held = random_blocks(len(pairs), generator)  # a random sub-model, as clients hold them
            loss = torch.stack(errors).sum() + torch.stack(chain_errors(teacher, surrogates, pairs, held)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            sums += torch.stack(errors).detach().cpu()
    for param in surrogates.parameters():
        param.requires_grad_(False)
    return (sums / len(loader)).tolist()


def teacher_model(cache_dir: Path, device: str | torch.device = "cpu",
                  adapters: Mapping[str, torch.Tensor] | None = None, lora: Any = None) -> nn.Module:
    """The full frozen backbone, with the global LoRA adapters plugged in when ``adapters`` is given."""
    model, _ = assemble(cache_dir, None, 0, device)
    if adapters is not None:
        from fedra_core.lora import attach_lora, load_trainable_state

        model = attach_lora(model, lora, head_seed=0).to(device)
        load_trainable_state(model, {k: v.to(device) for k, v in adapters.items() if "lora_" in k})
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def build_surrogates(cache_dir: Path, recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, str]:
    """Distill every block's surrogate from the cache's backbone and write the file; its metadata."""
    meta = read_meta(cache_dir)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        teacher = teacher_model(cache_dir, device)
        surrogates = surrogate_set(teacher.embed_dim, recipe.rank, range(meta.num_layers))
        errors = distill(teacher, surrogates, proxy_images(recipe, meta), recipe, device)
    identity = backbone_identity(cache_dir, meta)
    info = {"source": surrogate_source(recipe, identity), "backbone": identity, "rank": str(recipe.rank),
            "recipe": json.dumps(asdict(recipe), sort_keys=True), "seconds": f"{time.perf_counter() - start:.1f}",
            "relative_errors": json.dumps([round(e, 4) for e in errors])}
    write_surrogates(cache_dir, to_state(surrogates), info)
    logger.info("distilled %d block surrogates for %s (rank %d) in %s s; relative errors %s",
                meta.num_layers, cache_dir, recipe.rank, info["seconds"], info["relative_errors"])
    return info


def ensure_surrogates(cache_dir: Path, recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, str]:
    """The cache's surrogate metadata, distilling and writing them first when missing or stale.

    Concurrent callers wait on a lock beside the cache (as ``fedra_core.pretrain``), so
    only one distills; a file of another recipe, rank or backbone is replaced.
    """
    from fedra_core.pretrain import _file_lock

    cache_dir = Path(cache_dir).expanduser()
    source = surrogate_source(recipe, backbone_identity(cache_dir))
    if (info := read_info(cache_dir)) is not None and info.get("source") == source:
        return info
    with _file_lock(cache_dir.parent / f".{cache_dir.name}.surrogates.lock"):
        if (info := read_info(cache_dir)) is not None and info.get("source") == source:
            return info
        logger.info("%s the block surrogates of %s (once per cache and recipe)",
                    "rebuilding" if info is not None else "distilling", cache_dir)
        return build_surrogates(cache_dir, recipe, device)


def recipe_of(strategy: Any) -> Recipe:
    """The recipe an experiment's ``strategy.surrogates_*`` settings ask for."""
    return Recipe(rank=strategy.surrogates_rank, images=strategy.surrogates_images, epochs=strategy.surrogates_epochs,
                  proxy=strategy.surrogates_proxy or "shapes")


def _device(experiment: Any) -> str:
    """The server's distillation device: the experiment's when it has CUDA, else the CPU."""
    device = experiment.training.device
    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


class StandIns:
    """The block surrogates of a FedRA run: distilled by the server, put in the clients' skipped positions.

    ``frozen``: every node reads the ones it needs from its cache's file. ``redistill``:
    the server keeps the current ones in the method's memory (starting from the file),
    re-distills them from the global blocks (backbone + adapters) every
    ``strategy.surrogates_every`` rounds and sends each client those it needs.
    ``tuned``: the server keeps and sends them as for ``redistill``; each client trains
    those it runs beside its adapters and returns their deltas, and the server averages
    each block's surrogate over the clients that ran it (as FedRA averages a block's
    adapters over the clients that held it).
    """

    def __init__(self, experiment: Any) -> None:
        self.experiment = experiment
        self.recipe = recipe_of(experiment.strategy)
        self.redistill = experiment.strategy.surrogates == "redistill"
        self.tuned = experiment.strategy.surrogates == "tuned"
        self.sends = self.redistill or self.tuned  # the server keeps the current ones and sends them

    # -------------------------------------------------------------- server
    def prepare(self, cache_dir: Path) -> dict[str, Any]:
        """Distill the cache's surrogates once (kept when current); what the run's config records."""
        info = ensure_surrogates(cache_dir, self.recipe, _device(self.experiment))
        return {"surrogates": {"mode": self.experiment.strategy.surrogates, "source": info["source"],
                               "rank": self.recipe.rank, "distill_seconds": float(info["seconds"]),
                               "relative_errors": json.loads(info["relative_errors"])}}

    def to_send(self, memory: dict[str, Any], layers: Sequence[int], depth: int) -> dict[str, torch.Tensor]:
        """The current surrogates of the blocks a client holding ``layers`` skips, under ``surrogates.<i>.…``."""
        if not memory:
            modules, _ = load_surrogates(self.experiment.backbone.cache_path, range(depth), self.recipe.rank)
            memory.update({k[len(PREFIX):]: v for k, v in to_state(modules).items()})
            memory["rounds"] = torch.zeros((), dtype=torch.int64)
        skipped = {str(i) for i in range(depth) if i not in set(layers)}
        return {PREFIX + k: v for k, v in memory.items() if k.split(".", 1)[0] in skipped}

    def _count_round(self, memory: dict[str, Any]) -> None:
        """Count a round in ``memory``, filling it from the cache's file first when empty."""
        if not memory:
            self.to_send(memory, [], read_meta(self.experiment.backbone.cache_path).num_layers)
        memory["rounds"] = memory["rounds"] + 1

    def after_round(self, memory: dict[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Count the round; every ``surrogates_every`` rounds, re-distill from the new global blocks."""
        self._count_round(memory)
        if int(memory["rounds"]) % self.experiment.strategy.surrogates_every:
            return {"redistilled": False}
        start = time.perf_counter()
        cache, device = self.experiment.backbone.cache_path, _device(self.experiment)
        teacher = teacher_model(cache, device, state, self.experiment.backbone.lora)
        modules = from_state({PREFIX + k: v for k, v in memory.items() if k != "rounds"})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed + int(memory["rounds"]))
            errors = distill(teacher, modules, proxy_images(self.recipe, read_meta(cache)), self.recipe, device,
                             epochs=max(1, self.recipe.epochs // 2))  # warm: from the current ones
        memory.update({k[len(PREFIX):]: v for k, v in to_state(modules).items()})
        logger.info("re-distilled the block surrogates from the global blocks in %.1f s",
                    time.perf_counter() - start)
        return {"redistilled": True, "seconds": time.perf_counter() - start,
                "relative_errors": [round(e, 4) for e in errors]}

    def average(self, memory: dict[str, Any], deltas: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float] | None) -> dict[str, Any]:
        """``tuned``: each surrogate tensor plus the mean delta of the clients that ran it (FedRA's
        masked average); a tensor whose new value is not finite keeps the old one."""
        from fedra_core.aggregation import masked_average

        self._count_round(memory)
        current = {PREFIX + k: v for k, v in memory.items() if k != "rounds"}
        averaged = masked_average(current, deltas, weights)
        trained = {k for d in deltas for k in d if k in current}
        kept = sorted(k for k in trained if not torch.isfinite(averaged[k]).all())
        memory.update({k[len(PREFIX):]: averaged[k] for k in trained if k not in kept})
        blocks = sorted({int(k[len(PREFIX):].split(".", 1)[0]) for k in trained})
        return {"tuned_blocks": blocks, **({"not_finite_kept": kept} if kept else {})}

    # -------------------------------------------------------------- node
    @staticmethod
    def split(received: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A task's arrays as (trainable state, surrogates sent by the server)."""
        trainable = {k: v for k, v in received.items() if not k.startswith(PREFIX)}
        return trainable, {k: v for k, v in received.items() if k.startswith(PREFIX)}

    def fill(self, model: nn.Module, stats: Any, cache_dir: Path, device: str | torch.device,
             sent: Mapping[str, torch.Tensor]) -> tuple[nn.Module, Any]:
        """Put a surrogate in every skipped position of an assembled sub-model; the stats count what was read.

        ``redistill`` and ``tuned``: the surrogates the server sent; ``frozen`` (or nothing
        sent): those of the cache's file, of the skipped blocks only.
        """
        from fedra_core.backbone import AssemblyStats

        num_layers = read_meta(cache_dir).num_layers
        held = {int(name) for name, _ in model.blocks.named_children()}
        skipped = [i for i in range(num_layers) if i not in held]
        if sent and not self.sends:
            raise SurrogateError(f"the task sends surrogates ({sorted(sent)[:2]}…) but strategy.surrogates is frozen")
        if not skipped and not sent:
            return model, stats  # the full model: nothing to stand in for
        if sent:
            modules, read = from_state(sent, device), 0
        else:  # frozen, or a sub-model built outside a task (the probe): the file's
            modules, read = load_surrogates(cache_dir, skipped, self.recipe.rank, device)
        insert_surrogates(model, modules, num_layers)
        keys = tuple(to_state(modules))
        return model, AssemblyStats(stats.tensors_read + len(keys), stats.bytes_read + read,
                                    stats.keys_read + keys)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m fedra_core.surrogates build CACHE [--rank R] [--proxy-images DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedra_core.surrogates",
                                     description="Distill block surrogates for a backbone cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write <cache>/surrogates.safetensors (kept when current)")
    build.add_argument("cache", type=Path)
    build.add_argument("--rank", type=int, default=Recipe.rank)
    build.add_argument("--images", type=int, default=Recipe.images, help="proxy images per epoch "
                       "(strategy.surrogates_images: give the same value, or the run rebuilds them)")
    build.add_argument("--epochs", type=int, default=Recipe.epochs, help="strategy.surrogates_epochs")
    build.add_argument("--proxy-images", type=Path, help="a folder of unlabeled images (default: synthetic shapes)")
    build.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        recipe = Recipe(rank=args.rank, images=args.images, epochs=args.epochs,
                        proxy=str(args.proxy_images.resolve()) if args.proxy_images else "shapes")
    except ValueError as err:
        parser.error(str(err))
    info = ensure_surrogates(args.cache, recipe, args.device)
    print(f"{args.cache / SURROGATES_FILE}: {info['source']}, relative errors {info['relative_errors']}")


if __name__ == "__main__":
    main()
