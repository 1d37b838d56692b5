"""The experiment: frozen dataclasses built from YAML and run config in one place."""

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedra_core.methods import method_class, method_names, surrogate_methods

DATASETS = ("builtin-digits", "folder", "domainnet", "nicopp")
PARTITIONINGS = ("feature", "feature-label")
WEIGHTINGS = ("uniform", "num-examples")
DISTILL_TEACHERS = ("mean", "capacity", "confidence")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")
EVALUATION_MODES = ("server", "clients", "both")
BUILTIN_BACKBONES = ("digits-vit", "digits-vit-sd", "digits-vit-s", "digits-vit-l")


class ConfigError(ValueError):
    """An experiment setting is unknown, missing or impossible; the message names it."""


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not valid; expected {expected}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters attached to the frozen backbone (peft)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("attn.proj", "mlp.fc2")
    train_head: bool = True

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "backbone.lora.rank", self.rank, "an integer >= 1")
        _require(self.alpha > 0, "backbone.lora.alpha", self.alpha, "a number > 0")
        _require(0 <= self.dropout < 1, "backbone.lora.dropout", self.dropout, "0 <= p < 1")
        _require(len(self.target_modules) > 0, "backbone.lora.target_modules",
                 self.target_modules, "at least one module name")


@dataclass(frozen=True)
class AdapterSettings:
    """HeteroTune's DeMA adapter (fedra_core.hetero): the shared space, its experts and slots."""

    rank: int = 16  # size of the space every architecture shares
    experts: int = 4  # shared expert branches per slot, all active
    slots: int = 4  # shared slots; blocks map to them by relative depth
    input_hidden: int = 0  # channels of the shared input adapter (a residual conv on the image); 0: none

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "backbone.adapter.rank", self.rank, "an integer >= 1")
        _require(isinstance(self.input_hidden, int) and 0 <= self.input_hidden <= 256,
                 "backbone.adapter.input_hidden", self.input_hidden, "an integer in 0..256 (0: no input adapter)")
        _require(self.experts >= 1, "backbone.adapter.experts", self.experts, "an integer >= 1")
        _require(self.slots >= 1, "backbone.adapter.slots", self.slots, "an integer >= 1")


@dataclass(frozen=True)
class ArchitectureConfig:
    """One backbone of a heterogeneous federation (HeteroTune): its name, cache and builtin recipe."""

    name: str
    cache: str
    builtin: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and 0 < len(self.name) <= 32 and is_plain_name(self.name)
                 and "." not in self.name, "backbone.architectures[].name", self.name,
                 "a short plain name without '/' or '.'")
        _require(self.builtin is None or self.builtin in BUILTIN_BACKBONES,
                 f"backbone.architectures[{self.name}].builtin", self.builtin, f"null or one of {BUILTIN_BACKBONES}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache).expanduser()


@dataclass(frozen=True)
class BackboneConfig:
    """Where the frozen backbone lies and how it is adapted.

    A heterogeneous method (``hetero``, ``isolated``, ``hetero-largest``) reads
    ``architectures`` (smallest first, largest last) and ``adapter`` instead of
    ``cache``, ``builtin`` and ``lora``.
    """

    cache: str = "~/.cache/fedra/backbones/digits-vit"
    builtin: str | None = None  # a recipe that builds the cache when it is missing
    lora: LoraSettings = field(default_factory=LoraSettings)
    architectures: tuple[ArchitectureConfig, ...] = ()
    adapter: AdapterSettings = field(default_factory=AdapterSettings)

    def __post_init__(self) -> None:
        _require(self.builtin is None or self.builtin in BUILTIN_BACKBONES,
                 "backbone.builtin", self.builtin, f"null or one of {BUILTIN_BACKBONES}")
        archs = []
        for i, arch in enumerate(self.architectures):
            if isinstance(arch, Mapping):
                arch = _build(ArchitectureConfig, arch, f"backbone.architectures[{i}]")
            _require(isinstance(arch, ArchitectureConfig), f"backbone.architectures[{i}]", arch,
                     "a mapping with name, cache and optionally builtin")
            archs.append(arch)
        names = [a.name for a in archs]
        _require(len(set(names)) == len(names), "backbone.architectures", names, "distinct names")
        caches = [str(a.cache_path) for a in archs]
        _require(len(set(caches)) == len(caches), "backbone.architectures", caches, "a distinct cache each")
        object.__setattr__(self, "architectures", tuple(archs))

    @property
    def architecture_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.architectures)

    def architecture(self, name: str) -> ArchitectureConfig:
        """The architecture called ``name``; ``ConfigError`` naming the known ones."""
        for arch in self.architectures:
            if arch.name == name:
                return arch
        raise ConfigError(f"architecture {name!r} is not in backbone.architectures {self.architecture_names}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache).expanduser()


@dataclass(frozen=True)
class DataConfig:
    """The dataset, its domains and how it is split among clients."""

    dataset: str = "builtin-digits"
    root: str | None = None
    domains: tuple[str, ...] | None = None
    partitioning: str = "feature"
    clients_per_domain: int = 1
    dirichlet_alpha: float = 0.5
    min_samples: int = 10
    num_classes: int | None = None  # DomainNet: keep the first N classes
    test_fraction: float = 0.2
    max_test_per_domain: int | None = None
    # builtin-digits: every test digit drawn this many times per domain (its jitter and style drawn again),
    # so a test set of N digits holds N x test_renderings images; 1 is the test set as it always was
    test_renderings: int = 1
    # share of every domain's training images held back from the clients: the server's unlabeled proxy
    # set (HeteroTune's cross-architecture distillation); 0 keeps every image for the clients
    proxy_fraction: float = 0.0

    def __post_init__(self) -> None:
        _require(self.dataset in DATASETS, "data.dataset", self.dataset, f"one of {DATASETS}")
        _require(self.partitioning in PARTITIONINGS, "data.partitioning", self.partitioning,
                 f"one of {PARTITIONINGS}")
        _require(self.clients_per_domain >= 1, "data.clients_per_domain",
                 self.clients_per_domain, "an integer >= 1")
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "> 0")
        _require(self.min_samples >= 1, "data.min_samples", self.min_samples, ">= 1")
        _require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "in (0, 1)")
        _require(0 <= self.proxy_fraction <= 0.5, "data.proxy_fraction", self.proxy_fraction, "in [0, 0.5]")
        _require(type(self.test_renderings) is int and 1 <= self.test_renderings <= 64, "data.test_renderings",
                 self.test_renderings, "an integer in [1, 64]")
        _require(self.test_renderings == 1 or self.dataset == "builtin-digits", "data.test_renderings",
                 self.test_renderings, "1 for a dataset of image files (only builtin-digits renders its test digits)")
        _require(self.dataset == "builtin-digits" or self.root is not None, "data.root",
                 self.root, f"a folder path for dataset {self.dataset!r}")
        for domain in self.domains or ():
            _require(is_plain_name(domain), "data.domains", domain,
                     "plain folder names (no path separator, no '.' or '..')")


@dataclass(frozen=True)
class ClientsConfig:
    """Per-client (simulation partition) settings; a node's own node-config wins."""

    capacities: tuple[int, ...] = (12, 10, 8, 6, 4, 3)
    # HeteroTune: the architecture (a backbone.architectures name) each client runs, one per client
    architectures: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _require(len(self.capacities) > 0, "clients.capacities", self.capacities,
                 "one capacity per client")
        _require(self.architectures is None or len(self.architectures) == len(self.capacities),
                 "clients.architectures", self.architectures, f"one name per client ({len(self.capacities)})")


@dataclass(frozen=True)
class StrategyConfig:
    """How the server samples, allocates and aggregates."""

    method: str = "fedra"
    clients_per_round: int | None = None  # None: every known client
    one_per_domain: bool = False  # sample one client of each domain per round (paper)
    weighting: str = "uniform"
    min_clients: int = 1
    reply_timeout: float = 3600.0
    wire_dtype: str = "float32"  # "bfloat16" halves the bytes of every message
    clip_delta_norm: float | None = None  # scale each client's delta down to this L2 norm
    # baselines (fedra_core.baselines): DepthFL's exits and distillation, InclusiveFL's momentum
    depthfl_exit_every: int = 3  # an auxiliary classifier after every this many blocks
    depthfl_distill_weight: float = 1.0  # weight of the mutual self-distillation term
    # null: the weight is constant; R: it ramps up as exp(-5 (1 - min(r, R)/R)^2) over rounds r
    # (DepthFL's code and FedRA's reimplementation, R = their run's rounds)
    depthfl_distill_ramp_rounds: int | None = None
    # 0: plain per-key mean; > 0: momentum distillation as the reference code's agg_inclusiveFL,
    # this share (0.2 there) of the larger depth's last deltas mixed into each smaller depth's top block
    inclusivefl_momentum: float = 0.0
    # HeteroTune (method hetero): align the architectures' updates of every shared tensor before averaging
    cmga: bool = True
    # HeteroTune (method hetero): after averaging, the server distills every architecture's global model
    # towards the ensemble of all architectures' predictions on its unlabeled proxy set (data.proxy_fraction);
    # this many steps per architecture per round, 0: off. Only the architecture's private tensors move.
    # isolated and hetero-largest ignore it (no sharing across architectures), so one config serves all three.
    distill_steps: int = 0
    distill_batch_size: int = 64
    distill_lr: float = 1.0e-3
    distill_temperature: float = 2.0
    # mean: the architectures' mean probabilities; capacity: weighted by each one's width x depth;
    # confidence: weighted per image by each one's top probability
    distill_teacher: str = "capacity"
    # block surrogates (fedra_core.surrogates), fedra and fedra-cover only: null (none), frozen (distilled
    # once from the backbone), redistill (the server re-distills them from the current global blocks) or
    # tuned (clients train those in their skipped positions; the server averages each over its clients)
    surrogates: str | None = None
    surrogates_rank: int = 8  # width of each block's low-rank surrogate
    surrogates_every: int = 5  # redistill: re-distilled after every this many rounds
    surrogates_proxy: str | None = None  # a folder of unlabeled proxy images; null: synthetic shapes
    surrogates_images: int = 2048  # proxy images per distillation epoch (each build and re-distillation)
    surrogates_epochs: int = 4
    # head calibration (fedra_core.calibration): null (off) or lda: the server sets the global head to the
    # linear discriminant of the full model's features, from sums every node computes on its training images
    head_calibration: str | None = None
    calibrate_every: int = 0  # 0: after the last round only; N: after every N-th round and the last
    calibration_shrinkage: float | None = None  # share of the identity in the covariance; null: chosen by OAS

    def calibration_due(self, server_round: int, rounds: int) -> bool:
        """Whether the head is calibrated after round ``server_round`` of ``rounds``."""
        if not self.head_calibration or server_round < 1:
            return False
        return server_round >= rounds or (self.calibrate_every > 0 and server_round % self.calibrate_every == 0)

    def __post_init__(self) -> None:
        _require(self.method in method_names(), "strategy.method", self.method, f"one of {method_names()}")
        _require(self.surrogates in (None, "frozen", "redistill", "tuned"), "strategy.surrogates", self.surrogates,
                 "null, 'frozen', 'redistill' or 'tuned'")
        _require(self.surrogates is None or method_class(self.method).surrogates_allowed, "strategy.surrogates",
                 self.surrogates, f"null for strategy.method {self.method!r} (surrogates stand in for the blocks "
                 f"a random sub-model skips: methods {surrogate_methods()})")
        _require(self.head_calibration in (None, "lda"), "strategy.head_calibration", self.head_calibration,
                 "null or 'lda'")
        _require(self.head_calibration is None or not method_class(self.method).heterogeneous,
                 "strategy.head_calibration", self.head_calibration,
                 f"null for strategy.method {self.method!r} (each architecture has its own head)")
        _require(self.calibrate_every >= 0, "strategy.calibrate_every", self.calibrate_every, "an integer >= 0")
        _require(self.calibration_shrinkage is None or 0 <= self.calibration_shrinkage <= 1,
                 "strategy.calibration_shrinkage", self.calibration_shrinkage, "null (OAS) or a number in [0, 1]")
        _require(self.distill_steps >= 0, "strategy.distill_steps", self.distill_steps, "an integer >= 0")
        _require(self.distill_steps == 0 or method_class(self.method).heterogeneous, "strategy.distill_steps",
                 self.distill_steps, f"0 for strategy.method {self.method!r} (the server distills across "
                 "architectures: method hetero; isolated and hetero-largest ignore it, as they ignore cmga)")
        _require(self.distill_batch_size >= 1, "strategy.distill_batch_size", self.distill_batch_size,
                 "an integer >= 1")
        _require(self.distill_lr > 0, "strategy.distill_lr", self.distill_lr, "> 0")
        _require(self.distill_temperature > 0, "strategy.distill_temperature", self.distill_temperature, "> 0")
        _require(self.distill_teacher in DISTILL_TEACHERS, "strategy.distill_teacher", self.distill_teacher,
                 f"one of {DISTILL_TEACHERS}")
        _require(self.surrogates_rank >= 1, "strategy.surrogates_rank", self.surrogates_rank, "an integer >= 1")
        _require(self.surrogates_images >= 1, "strategy.surrogates_images", self.surrogates_images,
                 "an integer >= 1")
        _require(self.surrogates_epochs >= 1, "strategy.surrogates_epochs", self.surrogates_epochs,
                 "an integer >= 1")
        _require(self.surrogates_every >= 1, "strategy.surrogates_every", self.surrogates_every, "an integer >= 1")
        _require(self.depthfl_exit_every >= 1, "strategy.depthfl_exit_every", self.depthfl_exit_every,
                 "an integer >= 1")
        _require(self.depthfl_distill_weight >= 0, "strategy.depthfl_distill_weight",
                 self.depthfl_distill_weight, ">= 0")
        _require(self.depthfl_distill_ramp_rounds is None or self.depthfl_distill_ramp_rounds >= 1,
                 "strategy.depthfl_distill_ramp_rounds", self.depthfl_distill_ramp_rounds, "null or >= 1")
        _require(0 <= self.inclusivefl_momentum < 1, "strategy.inclusivefl_momentum",
                 self.inclusivefl_momentum, "0 <= share < 1")
        _require(self.weighting in WEIGHTINGS, "strategy.weighting", self.weighting,
                 f"one of {WEIGHTINGS}")
        _require(self.clients_per_round is None or self.clients_per_round >= 1,
                 "strategy.clients_per_round", self.clients_per_round, "null or >= 1")
        _require(self.min_clients >= 1, "strategy.min_clients", self.min_clients, ">= 1")
        _require(self.reply_timeout > 0, "strategy.reply_timeout", self.reply_timeout, "> 0")
        _require(self.wire_dtype in ("float32", "bfloat16"), "strategy.wire_dtype", self.wire_dtype,
                 "'float32' or 'bfloat16'")
        _require(self.clip_delta_norm is None or self.clip_delta_norm > 0, "strategy.clip_delta_norm",
                 self.clip_delta_norm, "null or a number > 0")


@dataclass(frozen=True)
class TrainingConfig:
    """Rounds and the local optimisation each client runs."""

    rounds: int = 20
    local_epochs: int = 1
    local_steps: int | None = None  # when set, overrides local_epochs
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    grad_clip: float | None = 10.0
    batch_size: int = 128
    eval_batch_size: int = 256
    device: str = "cpu"
    precision: str = "fp32"
    num_threads: int | None = None
    # worker processes that load and collate batches beside training (DataLoader's num_workers):
    # 0 loads them in the training process, on its critical path; a GPU node reading image
    # files needs several to keep the GPU busy
    loader_workers: int = 0

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "training.rounds", self.rounds, "an integer >= 1")
        _require(self.local_epochs >= 1, "training.local_epochs", self.local_epochs, ">= 1")
        _require(self.local_steps is None or self.local_steps >= 1, "training.local_steps",
                 self.local_steps, "null or >= 1")
        _require(self.optimizer in OPTIMIZERS, "training.optimizer", self.optimizer,
                 f"one of {OPTIMIZERS}")
        _require(self.lr > 0, "training.lr", self.lr, "> 0")
        _require(self.batch_size >= 1, "training.batch_size", self.batch_size, ">= 1")
        _require(self.precision in PRECISIONS, "training.precision", self.precision,
                 f"one of {PRECISIONS}")
        _require(is_device_name(self.device), "training.device", self.device,
                 "'cpu', 'cuda' or 'cuda:N'")
        _require(isinstance(self.loader_workers, int) and not isinstance(self.loader_workers, bool)
                 and self.loader_workers >= 0, "training.loader_workers", self.loader_workers,
                 "an integer >= 0")


@dataclass(frozen=True)
class EvaluationConfig:
    """Where the global model is evaluated: on the server's test sets, on the nodes' own, or both."""

    mode: str = "server"  # server | clients | both
    every: int = 1  # evaluate every N rounds (round 0 and the last round always)

    def __post_init__(self) -> None:
        _require(self.mode in EVALUATION_MODES, "evaluation.mode", self.mode, f"one of {EVALUATION_MODES}")
        _require(self.every >= 1, "evaluation.every", self.every, "an integer >= 1")

    @property
    def on_server(self) -> bool:
        return self.mode in ("server", "both")

    @property
    def on_clients(self) -> bool:
        return self.mode in ("clients", "both")

    def due(self, server_round: int, rounds: int) -> bool:
        """Whether round ``server_round`` (0 = untuned) of ``rounds`` is evaluated."""
        return server_round in (0, rounds) or server_round % self.every == 0


@dataclass(frozen=True)
class Experiment:
    """One FedRA experiment, fully resolved."""

    name: str = "default"
    seed: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        from fedra_core.methods import method_class

        archs, clients = self.backbone.architectures, self.clients.architectures
        method = self.strategy.method
        _require(not self.strategy.head_calibration or self.backbone.lora.train_head, "strategy.head_calibration",
                 self.strategy.head_calibration, "null when backbone.lora.train_head is false (no global head)")
        if not method_class(method).heterogeneous:
            _require(not archs and clients is None, "backbone.architectures / clients.architectures",
                     self.backbone.architecture_names or clients,
                     f"nothing for strategy.method {method!r} (only hetero, isolated and hetero-largest "
                     "mix architectures)")
            return
        _require(len(archs) >= 1, "backbone.architectures", archs,
                 f"at least one architecture for strategy.method {method!r}")
        _require(clients is not None, "clients.architectures", clients,
                 f"one architecture name per client for strategy.method {method!r}")
        for i, name in enumerate(clients or ()):
            _require(name in self.backbone.architecture_names, f"clients.architectures[{i}]", name,
                     f"one of backbone.architectures {self.backbone.architecture_names}")
        _require(self.strategy.distill_steps == 0 or self.data.proxy_fraction > 0, "data.proxy_fraction",
                 self.data.proxy_fraction, "> 0 with strategy.distill_steps (the server distills on these images)")
        _require(self.evaluation.mode == "server", "evaluation.mode", self.evaluation.mode,
                 f"'server' for strategy.method {method!r} (every architecture is evaluated on every domain "
                 "by the server; the nodes' evaluation covers one backbone)")

    @property
    def num_clients(self) -> int:
        return len(self.clients.capacities)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, no tuples) that ``experiment_from_dict`` reads back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def is_plain_name(name: Any) -> bool:
    """True for a non-empty name that stays inside its folder: no separator, not ``.`` or ``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and name == name.strip())


def is_device_name(device: str) -> bool:
    """True for ``cpu``, ``cuda`` and ``cuda:N``."""
    if device in ("cpu", "cuda"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by full name."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'experiment'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        nested = known[name].default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(nested):
            kwargs[name] = _build(nested, value, key)
        else:
            kwargs[name] = _coerce(known[name].type, value, key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix or 'experiment'}: {err}") from err


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    """Turn YAML lists into tuples and ints into floats where the field says so."""
    text = str(annotation)
    if value is None:
        if "None" not in text:
            raise ConfigError(f"{key}: null is not allowed")
        return None
    if text.startswith("tuple") or "tuple[" in text:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if annotation in (float, "float") or text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation in (int, "int") or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (bool, "bool") and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation in (str, "str") and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def experiment_from_dict(values: Mapping[str, Any]) -> Experiment:
    """Build and validate an experiment from a plain mapping (YAML or JSON)."""
    return _build(Experiment, values, "")


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read an experiment YAML file and apply dotted-key overrides.

    Parameters
    ----------
    path : str or Path
        The YAML file.
    overrides : Mapping[str, Any], optional
        Values keyed by dotted names, e.g. ``{"training.rounds": 3}``.

    Returns
    -------
    Experiment
        The validated experiment.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"experiment file {path} is not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"experiment file {path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(values, dotted, value)
    try:
        return experiment_from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


@dataclass(frozen=True)
class NodeLimits:
    """What a node accepts from a server's task; its own node-config can lower or raise them.

    A server (or whoever can submit a run) chooses the experiment; these limits keep it
    from exhausting the device. A task beyond them is refused with the reason.
    """

    max_lora_rank: int = 64
    max_batch_size: int = 1024
    max_eval_batch_size: int = 4096
    max_local_steps: int = 10_000
    max_local_epochs: int = 100
    max_classes: int = 100_000
    max_threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def check(self, experiment: "Experiment") -> None:
        """Raise ``TaskRefused`` naming the first setting of ``experiment`` beyond a limit."""
        training, data = experiment.training, experiment.data
        asked = [
            ("backbone.lora.rank", experiment.backbone.lora.rank, self.max_lora_rank, "max-lora-rank"),
            ("training.batch_size", training.batch_size, self.max_batch_size, "max-batch-size"),
            ("training.eval_batch_size", training.eval_batch_size, self.max_eval_batch_size,
             "max-eval-batch-size"),
            ("training.local_steps", training.local_steps or 0, self.max_local_steps, "max-local-steps"),
            ("training.local_epochs", training.local_epochs, self.max_local_epochs, "max-local-epochs"),
            ("data.num_classes", data.num_classes or 0, self.max_classes, "max-classes"),
            ("training.num_threads", training.num_threads or 0, self.max_threads, "max-threads"),
            ("training.loader_workers", training.loader_workers, self.max_threads, "max-threads"),
        ]
        for key, value, limit, node_key in asked:
            if value > limit:
                raise TaskRefused(f"the task asks {key} = {value}, beyond this node's limit {node_key}={limit}")


class TaskRefused(ValueError):
    """A server's task exceeds what this node accepts (its limits or its own capacity)."""


@dataclass(frozen=True)
class NodeSettings:
    """What belongs to one client device: from its node-config, else the experiment."""

    partition_id: int
    num_partitions: int
    max_layers: int
    data_root: str | None
    backbone_cache: Path
    device: str
    # max-layers or memory-budget-mb given by the node itself: no method may exceed it
    # (the experiment's per-partition capacity only stands in for a node in simulation).
    own_max_layers: int | None = None
    limits: NodeLimits = field(default_factory=NodeLimits)


LIMIT_KEYS = {"max-lora-rank": "max_lora_rank", "max-batch-size": "max_batch_size",
              "max-eval-batch-size": "max_eval_batch_size",
              "max-local-steps": "max_local_steps", "max-local-epochs": "max_local_epochs",
              "max-classes": "max_classes", "max-threads": "max_threads"}
NODE_CONFIG_KEYS = ("partition-id", "num-partitions", "max-layers", "data-root",
                    "backbone-cache", "device", "memory-budget-mb", *LIMIT_KEYS,
                    "worker", "worker-idle-seconds")  # the last two: client_app.worker's


def resolve_node(experiment: Experiment, node_config: Mapping[str, Any]) -> NodeSettings:
    """Merge a node's ``--node-config`` with the experiment's per-partition values.

    Parameters
    ----------
    experiment : Experiment
        The run's experiment.
    node_config : Mapping[str, Any]
        Flower's node config. In simulation it holds only ``partition-id`` and
        ``num-partitions``; a deployed SuperNode may add ``max-layers``,
        ``memory-budget-mb`` (``max-layers`` is then derived from the backbone's
        per-block size, or capped by it when both are given), ``data-root``,
        ``backbone-cache``, ``device`` and the limits of ``NodeLimits``
        (``max-lora-rank``, ``max-batch-size``, ``max-local-steps``,
        ``max-local-epochs``, ``max-classes``, ``max-threads``).

    Returns
    -------
    NodeSettings
        This node's settings; raises ``ConfigError`` naming a bad key, and
        ``TaskRefused`` when the experiment exceeds the node's limits.
    """
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"node-config: unknown key {unknown[0]!r}; known: {NODE_CONFIG_KEYS}")
    if "partition-id" not in node_config:
        raise ConfigError("node-config: 'partition-id' is missing")
    pid = _int_key(node_config, "partition-id")
    num = _int_key(node_config, "num-partitions") if "num-partitions" in node_config \
        else experiment.num_clients
    if not 0 <= pid < experiment.num_clients:
        raise ConfigError(f"node-config: partition-id {pid} is outside 0..{experiment.num_clients - 1}"
                          f" (the experiment has {experiment.num_clients} clients)")
    # The node's own paths always win: a server's experiment never chooses where a node reads.
    cache = node_config.get("backbone-cache", _default_cache(experiment, pid))
    own: int | None = None
    if "max-layers" in node_config:
        own = _int_key(node_config, "max-layers")
        if own < 1:
            raise ConfigError(f"node-config: max-layers={own} is not a positive integer")
    if "memory-budget-mb" in node_config:
        fits = _layers_for_budget(node_config["memory-budget-mb"], Path(str(cache)).expanduser())
        own = min(own, fits) if own is not None else fits
    device = str(node_config.get("device", experiment.training.device))
    _require(is_device_name(device), "node-config device", device, "'cpu', 'cuda' or 'cuda:N'")
    limits = NodeLimits(**{attr: _int_key(node_config, key) for key, attr in LIMIT_KEYS.items()
                           if key in node_config})
    limits.check(experiment)
    return NodeSettings(
        partition_id=pid,
        num_partitions=num,
        max_layers=own if own is not None else experiment.clients.capacities[pid],
        data_root=node_config.get("data-root", experiment.data.root),
        backbone_cache=Path(str(cache)).expanduser(),
        device=device,
        own_max_layers=own,
        limits=limits,
    )


def _default_cache(experiment: Experiment, partition_id: int) -> str:
    """The cache a partition reads unless its node-config names one: its architecture's, or the one backbone's."""
    from fedra_core.methods import method_for

    architecture = method_for(experiment).architecture_of(partition_id)
    if architecture is None:
        return experiment.backbone.cache
    return experiment.backbone.architecture(architecture).cache


def _layers_for_budget(budget_mb: Any, cache: Path) -> int:
    """Blocks that fit in ``memory-budget-mb`` (read from the backbone cache's weights header)."""
    from fedra_core.capacity import backbone_sizes, layers_for_budget  # reads the cache: clients only

    if isinstance(budget_mb, bool) or not isinstance(budget_mb, (int, float)) or budget_mb <= 0:
        raise ConfigError(f"node-config: memory-budget-mb={budget_mb!r} is not a positive number of MiB")
    try:
        return layers_for_budget(float(budget_mb), backbone_sizes(cache))
    except ValueError as err:
        raise ConfigError(f"node-config: {err}") from err


def _int_key(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node-config: {key}={value!r} is not an integer") from None
