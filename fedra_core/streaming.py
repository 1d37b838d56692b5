"""The full-depth global model run block by block from the cache, for nodes that cannot hold it.

A node that holds k of L blocks can still evaluate (or predict with) the exact L-block
global model: the shared parts (patch embedding, class and position tokens, final
norm, head) stay in memory, and each block is read from the backbone cache, given its
adapters, run over *every* image of the evaluation, and freed before the next one is
read. Every block is therefore read once per evaluation, never once per batch, and the
weights held at any time are the shared parts plus one block. The tokens of the whole
evaluation, ``(N, T, C)`` floats (0.6 MB per 224-pixel image for ViT-B/16), stay in the
host's memory between blocks.

Each block is adapted by the same ``attach_lora`` and loaded by the same
``load_trainable_state`` as the in-memory ``GlobalModel``, under the same global names
(``blocks.7.attn.proj.lora_A.weight``), so the math is peft's own:
``W x + B A x * scaling``. Supported: timm VisionTransformer backbones (ViT, DeiT),
the full-depth model of every method and ``all-small``'s shallow one (``layers``);
DepthFL's exit classifiers are not evaluated (``without_exits`` drops them, and the
model's own head, DepthFL's deepest classifier, gives the logits).
"""

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedra_core.backbone import (
    WEIGHTS_FILE,
    BackboneCacheError,
    _skeleton,
    assemble,
    check_layers,
    read_meta,
)
from fedra_core.baselines import EXIT_NAME
from fedra_core.config import LoraSettings
from fedra_core.lora import State, StateMismatchError, attach_lora, block_of, load_trainable_state, slice_state
from fedra_core.training import EvalResult, autocast

logger = logging.getLogger(__name__)


class _BlockHost(nn.Module):
    """One block named by its global index (``blocks.7``), so its tensors carry global names.

    It has no classifier: ``attach_lora`` and ``load_trainable_state`` then adapt and
    load only the block's LoRA tensors.
    """

    def __init__(self, index: int, block: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(OrderedDict([(str(index), block)]))

    def get_classifier(self) -> nn.Module:
        return nn.Identity()  # not a submodule: no classifier keys, no head to draw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def without_exits(state: Mapping[str, torch.Tensor]) -> State:
    """The state without DepthFL's exit classifiers (``blocks.<i>.exit.*``), which streaming does not run."""
    return {k: v for k, v in state.items() if f".{EXIT_NAME}." not in k}


def _embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Tokens entering the first block, as timm's ``VisionTransformer.forward_features`` makes them."""
    x = model.patch_embed(images)  # (B, P, C)
    x = model._pos_embed(x)  # (B, T, C): class / register tokens and position embedding
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _classify(model: nn.Module, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Logits from the last block's tokens: final norm, pooling, head (``pre_logits``: the head's input)."""
    return model.forward_head(model.norm(tokens), pre_logits=pre_logits)  # (B, num_classes) or (B, C)


class StreamedGlobalModel:
    """The global model (all blocks, or the listed ones) evaluated block by block from the cache.

    The counterpart of ``fedra_core.evaluation.GlobalModel`` for a node that cannot
    hold every block: the same constructor arguments and the same ``evaluate``.

    Parameters
    ----------
    cache_dir : Path
        The backbone cache.
    num_classes : int
        Size of the head.
    lora : LoraSettings
        The run's LoRA settings (targets, rank, alpha; whether the head trains).
    device : str
        Where each block computes (``cpu``, ``cuda``, ``cuda:N``); tokens between
        blocks stay on the CPU.
    seed : int
        The run's seed (a frozen head is drawn from it, as every node draws it).
    layers : Sequence[int] or None
        Global blocks of the evaluated model, ascending; ``None`` for all.
    batch_size : int
        Images (tokens) run through a block at once. It bounds the activations, which
        on a CPU are as large as a few blocks (about 240 MiB at 32 ViT-B/16 images):
        a node short of memory gives a small one, since blocks are read once whatever
        it is (``docs/PERFORMANCE.md``).
    """

    def __init__(self, cache_dir: Path, num_classes: int, lora: LoraSettings, device: str = "cpu",
                 seed: int = 0, layers: Sequence[int] | None = None, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(self.cache_dir)
        self.layers = list(range(self.meta.num_layers)) if layers is None else check_layers(
            layers, self.meta.num_layers)
        self.num_classes, self.lora, self.seed = num_classes, lora, seed
        self.device = torch.device(device)
        self.batch_size = batch_size
        skeleton = _skeleton(self.meta, num_classes)  # on the meta device: structure only, no memory
        if not hasattr(skeleton, "_pos_embed"):
            raise BackboneCacheError(f"{self.meta.timm_name}: streaming runs timm VisionTransformer backbones only")
        self._blocks = skeleton.blocks  # meta blocks: a copy of one is filled with its weights when it runs

    def evaluate(self, state: Mapping[str, torch.Tensor], test_sets: Mapping[str, Dataset],
                 batch_size: int | None = None, precision: str = "fp32") -> dict[str, dict[str, float]]:
        """Loss, accuracy and size of every domain's test set under ``state``, as ``GlobalModel.evaluate``.

        All test sets go through each block together: every block is read once.
        ``batch_size`` overrides the constructor's for this call.
        """
        names = list(test_sets)
        logits, labels = self._run(state, [test_sets[n] for n in names], batch_size, precision)
        results = {}
        for name, set_logits, set_labels in zip(names, logits, labels):
            result = _score(set_logits, set_labels)
            results[name] = {"loss": result.loss, "accuracy": result.accuracy, "num_examples": result.num_examples}
        return results

    def logits(self, state: Mapping[str, torch.Tensor], images: torch.Tensor | Dataset,
               batch_size: int | None = None, precision: str = "fp32") -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``(N, 3, H, W)`` or of a dataset's images, under ``state``."""
        logits, _ = self._run(state, [images], batch_size, precision)
        return logits[0]

    def features(self, state: Mapping[str, torch.Tensor], dataset: Dataset, batch_size: int | None = None,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
        """The head's input features ``(N, d)`` and labels ``(N,)`` of a dataset under ``state`` (head calibration)."""
        features, labels = self._run(state, [dataset], batch_size, precision, pre_logits=True)
        return features[0], labels[0]

    @torch.no_grad()
    def _run(self, state: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor | Dataset],
             batch_size: int | None, precision: str, pre_logits: bool = False
             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Logits (the head's input with ``pre_logits``) and labels of each input, every block read once."""
        self._check_blocks_of(state)
        size = batch_size or self.batch_size
        shell = self._shell(state)  # shared parts and the first block
        tokens, labels = self._embed_all(shell, inputs, size, precision)  # (N, T, C) in host memory, (N,)
        self._apply(shell.blocks, tokens, size, precision)
        shell.blocks = nn.Sequential()  # the first block is freed before the second is read
        for index in self.layers[1:]:
            block = self._block(index, state)
            self._apply(block, tokens, size, precision)
            del block  # freed before the next block is read
        logits = torch.cat([self._head(shell, tokens[i:i + size], precision, pre_logits)
                            for i in range(0, len(tokens), size)])  # (N, num_classes)
        bounds = torch.tensor([0, *[len(x) for x in inputs]]).cumsum(0).tolist()
        return ([logits[a:b] for a, b in zip(bounds, bounds[1:])],
                [labels[a:b] for a, b in zip(bounds, bounds[1:])])

    def _check_blocks_of(self, state: Mapping[str, torch.Tensor]) -> None:
        """A state with adapters of blocks outside the model does not belong to it."""
        foreign = sorted({block_of(k) for k in state} - {None, *self.layers})
        if foreign:
            raise StateMismatchError(f"the state holds blocks {foreign[:6]} that the model "
                                     f"(blocks {self.layers}) does not have")

    def _shell(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """Shared parts, head and the first block, adapted and loaded exactly as ``GlobalModel``."""
        first = self.layers[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the fresh head and LoRA init are overwritten; keep the caller's RNG
            model, _ = assemble(self.cache_dir, [first], self.num_classes, "cpu")
            model = attach_lora(model, self.lora, head_seed=self.seed)
        load_trainable_state(model, slice_state(state, [first]))
        return model.to(self.device).eval()

    def _block(self, index: int, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """Block ``index`` read from the cache (only its tensors), with its adapters from ``state``."""
        prefix = f"blocks.{index}."
        with safe_open(str(self.cache_dir / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if k.startswith(prefix)]
            weights = {k[len(prefix):]: f.get_tensor(k) for k in keys}
        block = copy.deepcopy(self._blocks[index])  # (meta) structure of this block
        try:
            block.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as err:
            raise BackboneCacheError(f"{self.cache_dir}: block {index} does not fit {self.meta.timm_name}: "
                                     f"{str(err).splitlines()[0]}") from err
        host = _BlockHost(index, block)
        with torch.random.fork_rng(devices=[]):
            host = attach_lora(host, self.lora, head_seed=self.seed)  # LoRA init is overwritten just below
        load_trainable_state(host, {k: v for k, v in state.items() if block_of(k) == index})
        return host.to(self.device).eval()

    def _embed_all(self, shell: nn.Module, inputs: Sequence[torch.Tensor | Dataset], size: int,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(N, T, C)`` in host memory and labels ``(N,)`` (-1 for bare images) of all inputs."""
        total = sum(len(x) for x in inputs)
        if total == 0:
            raise ValueError("nothing to evaluate: the input holds no images")
        tokens = torch.empty(0)
        labels = torch.full((total,), -1, dtype=torch.long)
        start = 0
        for batch, batch_labels in (b for x in inputs for b in _batches(x, size)):
            with autocast(self.device, precision):
                out = _embed(shell, batch.to(self.device)).float().cpu()  # (B, T, C)
            if start == 0:
                tokens = torch.empty((total, *out.shape[1:]))  # allocated once: no copy of all tokens
            tokens[start:start + len(out)] = out
            if batch_labels is not None:
                labels[start:start + len(out)] = torch.as_tensor(batch_labels)
            start += len(out)
        return tokens, labels

    def _apply(self, block: nn.Module, tokens: torch.Tensor, size: int, precision: str) -> None:
        """Run one block over all tokens, in place, ``size`` images at a time."""
        for start in range(0, len(tokens), size):
            with autocast(self.device, precision):
                out = block(tokens[start:start + size].to(self.device))  # (B, T, C)
            tokens[start:start + size] = out.float().cpu()

    def _head(self, shell: nn.Module, tokens: torch.Tensor, precision: str, pre_logits: bool = False) -> torch.Tensor:
        with autocast(self.device, precision):
            return _classify(shell, tokens.to(self.device), pre_logits).float().cpu()  # (B, num_classes or C)


def _batches(images: torch.Tensor | Dataset, size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches of images (and labels, None for a bare tensor) in order."""
    if isinstance(images, torch.Tensor):
        return ((images[i:i + size], None) for i in range(0, len(images), size))
    return iter(DataLoader(images, batch_size=size, shuffle=False))


def _score(logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Mean cross-entropy and accuracy of logits ``(N, C)`` against labels ``(N,)``."""
    count = max(len(labels), 1)
    loss = float(nn.functional.cross_entropy(logits, labels, reduction="sum")) / count
    correct = int((logits.argmax(dim=1) == labels).sum())
    return EvalResult(loss, correct / count, len(labels))


def stream_logits(cache_dir: Path, state: Mapping[str, torch.Tensor], images: torch.Tensor | Dataset,
                  lora: LoraSettings, num_classes: int, device: str = "cpu", batch_size: int = 32,
                  seed: int = 0, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Logits of the global model under ``state``, streaming its blocks from the cache.

    Parameters
    ----------
    cache_dir : Path
        The backbone cache.
    state : Mapping[str, Tensor]
        The global trainable state (LoRA and head, global names); DepthFL's exits
        must be dropped first (``without_exits``).
    images : Tensor or Dataset
        Normalized images ``(N, 3, H, W)``, or a dataset of ``(image, label)``.
    lora : LoraSettings
        The run's LoRA settings.
    num_classes : int
        Size of the head.
    device : str
        Where the blocks compute.
    batch_size : int
        Images run through a block at once.
    seed : int
        The run's seed (a frozen head is drawn from it).
    layers : Sequence[int] or None
        Global blocks of the model (``all-small``'s shallow one), ``None`` for all.

    Returns
    -------
    Tensor
        ``(N, num_classes)`` float32 logits, in input order.
    """
    model = StreamedGlobalModel(cache_dir, num_classes, lora, device, seed, layers, batch_size)
    return model.logits(state, images)


def stream_evaluate(cache_dir: Path, state: Mapping[str, torch.Tensor], dataset: Dataset, lora: LoraSettings,
                    num_classes: int, device: str = "cpu", batch_size: int = 32, seed: int = 0,
                    layers: Sequence[int] | None = None, precision: str = "fp32") -> EvalResult:
    """Loss, accuracy and count of the global model on one test set, streaming its blocks.

    Parameters are those of ``stream_logits``; ``dataset`` yields ``(image, label)``
    and ``precision`` is ``fp32``, ``bf16`` or ``fp16`` (autocast, as ``evaluate``).

    Returns
    -------
    EvalResult
        Mean loss, accuracy and number of examples.
    """
    model = StreamedGlobalModel(cache_dir, num_classes, lora, device, seed, layers, batch_size)
    logits, labels = model._run(state, [dataset], None, precision)
    return _score(logits[0], labels[0])
