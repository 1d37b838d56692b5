"""A client's part of a round: assemble its sub-model, train it, return the deltas."""

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fedra_core.backbone import AssemblyStats, read_meta
from fedra_core.config import Experiment, NodeSettings, TrainingConfig
from fedra_core.data.builtin import ImageTensorDataset
from fedra_core.lora import State
from fedra_core.methods import method_for
from fedra_core.training import TrainResult, train_local

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRound:
    """The outcome of one client's local round."""

    delta: State
    result: TrainResult
    assembly: AssemblyStats
    setup_seconds: float


def resolve_device(device: str) -> torch.device:
    """The configured device, with a clear error when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices here")
    return dev


def build_submodel(experiment: Experiment, node: NodeSettings, layers: list[int], num_classes: int,
                   received: Mapping[str, torch.Tensor], architecture: str | None = None
                   ) -> tuple[torch.nn.Module, AssemblyStats]:
    """Sub-model of ``layers`` from the node's cache, adapted, with the received state loaded."""
    device = resolve_device(node.device)
    method = method_for(experiment)
    received, extras = method.split_received(received)  # extras: what the method sends beside (surrogates)
    model, stats = method.assemble(node.backbone_cache, layers, num_classes, device, extras)
    model = method.build(model, num_classes, read_meta(node.backbone_cache).num_layers, architecture).to(device)
    method.load_state(model, {k: v.to(device) for k, v in received.items()}, architecture)
    return model, stats


class DeviceTensorBatches:
    """Batches of an in-memory tensor data set gathered on the GPU.

    The data set is copied to the device once per round and every batch is an index into
    it: no per-sample collation, no pinned host copy per batch, nothing on the host between
    two steps. The indices come from a DataLoader over positions with the sampler, generator
    and ``drop_last`` of the ordinary loader, so the batches are the ones it would give, in
    the same order.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], positions: DataLoader, device: torch.device) -> None:
        self.tensors = tuple(t.to(device) for t in tensors)
        self.positions = positions
        self.device = device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for index in self.positions:
            index = index.to(self.device, non_blocking=True)
            yield tuple(t[index] for t in self.tensors)

    def __len__(self) -> int:
        return len(self.positions)


def tensors_in_memory(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The (images, labels) tensors of a plain in-memory tensor data set or a subset of one, else None.

    Only data sets whose items are exactly rows of their tensors qualify (``TensorDataset``
    and the built-in benchmark's ``ImageTensorDataset``), not subclasses that transform items.
    """
    indices = None
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(list(dataset.indices), dtype=torch.long)
    plain = type(dataset) is TensorDataset or type(dataset) is ImageTensorDataset
    if not plain or len(dataset.tensors) != 2:
        return None
    return tuple(t if indices is None else t[indices] for t in dataset.tensors)


def training_batches(train_set: Dataset, cfg: TrainingConfig, generator: torch.Generator,
                     device: torch.device) -> Iterable:
    """The round's batches: gathered on the GPU when the data are tensors that fit, else a DataLoader.

    On CUDA, an in-memory tensor data set that takes at most a quarter of the device's free
    memory goes to the device (``DeviceTensorBatches``), unless ``training.loader_workers``
    asks for loader processes. Anything else loads through a DataLoader, with
    ``loader_workers`` processes (a GPU node reading image files needs them) and pinned
    memory on CUDA. Every way gives the same batches in the same order.
    """
    drop_last = len(train_set) > cfg.batch_size
    if device.type == "cuda" and not cfg.loader_workers:
        tensors = tensors_in_memory(train_set)
        size = sum(t.numel() * t.element_size() for t in tensors) if tensors else None
        if size is not None and size <= torch.cuda.mem_get_info(device)[0] // 4:
            positions = DataLoader(range(len(train_set)), batch_size=cfg.batch_size, shuffle=True,
                                   generator=generator, drop_last=drop_last)
            return DeviceTensorBatches(tensors, positions, device)
    return DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=drop_last,
                      pin_memory=device.type == "cuda", num_workers=cfg.loader_workers,
                      prefetch_factor=4 if cfg.loader_workers else None)


def run_local_round(experiment: Experiment, node: NodeSettings, layers: list[int],
                    received: Mapping[str, torch.Tensor], train_set: torch.utils.data.Dataset,
                    num_classes: int, server_round: int, architecture: str | None = None) -> LocalRound:
    """Train the held blocks' adapters (and the head) on local data.

    Parameters
    ----------
    experiment : Experiment
        Training settings (optimizer, lr, steps or epochs, batch size, precision).
    node : NodeSettings
        This device's backbone cache and torch device.
    layers : list[int]
        Global indices of the blocks this client holds this round.
    received : Mapping[str, Tensor]
        The global state of those blocks and of the shared parts.
    train_set : Dataset
        Local training data.
    num_classes : int
        Size of the label space.
    server_round : int
        The round, which seeds the data order together with the run's seed and sets
        DepthFL's distillation weight when it ramps.
    architecture : str, optional
        The backbone architecture the node runs (heterogeneous methods): the task
        names it; by default the one the experiment gives the node's partition.

    Returns
    -------
    LocalRound
        Deltas (trained minus received) keyed by global names, and what happened.
    """
    start = time.perf_counter()
    num_layers = read_meta(node.backbone_cache).num_layers
    method = method_for(experiment)
    architecture = architecture or method.architecture_of(node.partition_id)
    if len(layers) > method.max_blocks(node.max_layers, num_layers):
        raise ValueError(f"the server sent {len(layers)} blocks but this node holds at most {node.max_layers}")
    model, stats = build_submodel(experiment, node, layers, num_classes, received, architecture)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(experiment.seed * 100_003 + server_round * 1009 + node.partition_id)
    cfg = experiment.training
    loader = training_batches(train_set, cfg, generator, device)
    setup = time.perf_counter() - start
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(generator.initial_seed()))  # LoRA dropout
        result = train_local(model, loader, cfg, device, loss_fn=method.loss(server_round))
    trained = method.trainable_state(model, architecture)
    received, extras = method.split_received(received)  # the delta covers the trainable part only,
    if method.returns_extras:  # and what the method sent beside it when the client trains that too
        received = {**received, **extras}
    delta = {k: (trained[k] - received[k].to(device)).cpu() for k in received}
    return LocalRound(delta, result, stats, setup)

