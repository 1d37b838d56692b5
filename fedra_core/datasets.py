"""The experiment's data: which domains exist, a client's shard, the server's test sets."""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedra_core.backbone import CacheMeta
from fedra_core.config import DataConfig, Experiment, NodeSettings

if TYPE_CHECKING:
    from fedra_core.data import DomainData

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NICOPP_DOMAINS = ("autumn", "dim", "grass", "outdoor", "rock", "water")


@dataclass(frozen=True)
class ClientData:
    """One client's local data."""

    domain: str
    train: Dataset
    test: Dataset
    num_classes: int


def domain_names(cfg: DataConfig, root: str | None = None) -> tuple[str, ...]:
    """The domains of the dataset, in client order."""
    if cfg.domains:
        return tuple(cfg.domains)
    if cfg.dataset == "builtin-digits":
        from fedra_core.data import BUILTIN_DOMAINS

        return tuple(BUILTIN_DOMAINS)
    if cfg.dataset == "domainnet":
        return DOMAINNET_DOMAINS
    if cfg.dataset == "nicopp":
        return NICOPP_DOMAINS
    folder = Path(str(root or cfg.root)).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root {folder} is not a folder")
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


@functools.lru_cache(maxsize=4)
def load_domains(cfg: DataConfig, root: str | None, image_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], seed: int, names: tuple[str, ...]) -> tuple:
    """Load the named domains (memoized: clients reuse them across rounds)."""
    from fedra_core import data

    if cfg.dataset == "builtin-digits":
        every = data.builtin_digits(image_size=image_size, seed=seed, test_fraction=cfg.test_fraction)
        by_name = {d.name: d for d in every}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"data.domains: {unknown} are not builtin domains {sorted(by_name)}")
        return tuple(by_name[n] for n in names)
    folder = Path(str(root)).expanduser()
    if cfg.dataset == "domainnet":
        return tuple(data.load_domainnet(folder, image_size, mean, std, num_classes=cfg.num_classes or 100,
                                         domains=names))
    if cfg.dataset == "nicopp":
        return tuple(data.load_nicopp(folder, image_size, mean, std, domains=names))
    return tuple(data.load_image_folder_domains(folder, image_size, mean, std,
                                                test_fraction=cfg.test_fraction, seed=seed, domains=names))


def _load(experiment: Experiment, meta: CacheMeta, root: str | None, names: Sequence[str]) -> tuple:
    cfg = experiment.data
    return load_domains(cfg, root, meta.image_size, tuple(meta.mean), tuple(meta.std),
                        experiment.seed, tuple(names))


def _shard_indices(experiment: Experiment, domain: "DomainData", domain_index: int, shard: int) -> np.ndarray:
    """Indices of one client's shard inside its domain, less the server's proxy images; the same on every machine."""
    from fedra_core.data import partition_dirichlet, partition_feature_skew

    cfg = experiment.data
    rng = np.random.default_rng([experiment.seed, domain_index])
    if cfg.partitioning == "feature":
        shards = partition_feature_skew([domain], cfg.clients_per_domain, rng)
    else:
        shards = partition_dirichlet([domain], cfg.clients_per_domain, cfg.dirichlet_alpha,
                                     cfg.min_samples, rng)
    indices = shards[shard].indices
    if cfg.proxy_fraction > 0:  # drawn apart from the shards, so a fraction of 0 leaves them as they were
        indices = np.setdiff1d(indices, proxy_indices(experiment, domain, domain_index), assume_unique=True)
        if len(indices) == 0:
            raise ValueError(f"data.proxy_fraction {cfg.proxy_fraction} leaves client {shard} of domain "
                             f"{domain.name!r} no training image")
    return indices


def proxy_indices(experiment: Experiment, domain: "DomainData", domain_index: int) -> np.ndarray:
    """The training images of a domain that ``data.proxy_fraction`` keeps for the server, every class in proportion."""
    from fedra_core.data import stratified_subset

    labels = np.asarray(domain.train_labels)
    size = int(round(experiment.data.proxy_fraction * len(labels)))
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    return stratified_subset(labels, size, np.random.default_rng([experiment.seed, domain_index, 7919]))


def proxy_sets(experiment: Experiment, meta: CacheMeta, root: str | None = None) -> dict[str, Dataset]:
    """Every domain's proxy images (``data.proxy_fraction`` of its training split), which no client trains on.

    The server uses them without their labels.
    """
    names = domain_names(experiment.data, root)
    domains = _load(experiment, meta, root or experiment.data.root, names)
    return {d.name: Subset(d.train, proxy_indices(experiment, d, i).tolist()) for i, d in enumerate(domains)}


def domain_of_partition(experiment: Experiment, partition_id: int, root: str | None = None) -> str:
    """The domain a partition belongs to (clients are ordered domain-major)."""
    names = domain_names(experiment.data, root)
    return names[partition_id // experiment.data.clients_per_domain]


def client_data(experiment: Experiment, node: NodeSettings, meta: CacheMeta) -> ClientData:
    """The shard of partition ``node.partition_id``: its domain's data, split among its clients."""
    names = domain_names(experiment.data, node.data_root)
    cpd = experiment.data.clients_per_domain
    if len(names) * cpd != experiment.num_clients:
        raise ValueError(f"{len(names)} domains x {cpd} clients per domain != "
                         f"{experiment.num_clients} capacities in clients.capacities")
    domain_index = node.partition_id // cpd
    needs_all = experiment.data.dataset == "folder"  # its label space is the union of all domains
    loaded = _load(experiment, meta, node.data_root, names if needs_all else names[domain_index:domain_index + 1])
    domain = loaded[domain_index if needs_all else 0]
    indices = _shard_indices(experiment, domain, domain_index, node.partition_id % cpd)
    test = domain_test_set(experiment, meta, domain, domain_index)  # the same items the server would evaluate on
    return ClientData(domain.name, Subset(domain.train, indices.tolist()), test, len(domain.classes))


def test_sets(experiment: Experiment, meta: CacheMeta, root: str | None = None
              ) -> tuple[dict[str, Dataset], int]:
    """Every domain's test set (the server evaluates the global model on them)."""
    names = domain_names(experiment.data, root)
    domains = _load(experiment, meta, root or experiment.data.root, names)
    sets = {d.name: domain_test_set(experiment, meta, d, i) for i, d in enumerate(domains)}
    return sets, len(domains[0].classes)


def domain_test_set(experiment: Experiment, meta: CacheMeta, domain: "DomainData", domain_index: int) -> Dataset:
    """A domain's test set: capped (``data.max_test_per_domain``), then every image drawn again
    ``data.test_renderings - 1`` more times (the built-in benchmark only), the same digits each time."""
    cfg = experiment.data
    test = capped_test_set(domain, cfg.max_test_per_domain, experiment.seed, domain_index) \
        if cfg.max_test_per_domain else domain.test
    if cfg.test_renderings == 1:
        return test
    from fedra_core.data.builtin import BUILTIN_DOMAINS, builtin_test_rendering

    parts = [test]
    for rendering in range(1, cfg.test_renderings):
        drawn = builtin_test_rendering(meta.image_size, experiment.seed, cfg.test_fraction, rendering)
        again = drawn[BUILTIN_DOMAINS.index(domain.name)]
        parts.append(Subset(again, list(test.indices)) if isinstance(test, Subset) else again)
    return ConcatDataset(parts)


def capped_test_set(domain: "DomainData", cap: int, seed: int, domain_index: int) -> Dataset:
    """At most ``cap`` test items of a domain, every class in proportion (``data.max_test_per_domain``).

    Folder, DomainNet and NICO++ test sets list their files class by class, so their
    first ``cap`` items would hold only the first classes: draw a stratified subset,
    the same for every method of a seed. A test set already in a seeded random order
    (the built-in benchmark's) keeps its first ``cap`` items, which are a random subset.
    """
    test = domain.test
    if domain.test_shuffled:
        return Subset(test, range(min(cap, len(test))))
    from fedra_core.data import stratified_subset

    rng = np.random.default_rng([seed, domain_index, len(test)])
    return Subset(test, stratified_subset(_labels_of(test), cap, rng).tolist())


def _labels_of(dataset: Dataset) -> np.ndarray:
    """Labels of a dataset in order, without decoding images where the dataset knows them."""
    known = getattr(dataset, "train_labels", None)  # ImageFileDataset: the labels of its own files
    if known is not None:
        return np.asarray(known)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]
