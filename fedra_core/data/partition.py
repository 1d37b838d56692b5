"""Split domains among clients: feature skew (IID within a domain) and feature + label skew (Dirichlet)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch.utils.data import Subset

from fedra_core.data.builtin import DomainData

logger = logging.getLogger(__name__)

_MAX_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True)
class ClientShard:
    """The data of one client: indices into the train set of one domain.

    Attributes
    ----------
    domain : int
        Position of the domain in the list of domains.
    indices : numpy.ndarray
        (n,) int64 sorted indices into that domain's train set.
    """

    domain: int
    indices: np.ndarray


def shard_dataset(domains: Sequence[DomainData], shard: ClientShard) -> Subset:
    """The client's training data as a ``torch.utils.data.Subset`` of its domain's train set.

    Parameters
    ----------
    domains : sequence of DomainData
        The domains the shard was cut from.
    shard : ClientShard
        The client's shard.

    Returns
    -------
    torch.utils.data.Subset
        Items of ``domains[shard.domain].train`` at ``shard.indices``.
    """
    return Subset(domains[shard.domain].train, shard.indices.tolist())


def _check_clients(domains: Sequence[DomainData], clients_per_domain: int) -> None:
    if clients_per_domain < 1:
        raise ValueError(f"clients_per_domain must be at least 1, got {clients_per_domain}")
    for domain in domains:
        if len(domain.train_labels) < clients_per_domain:
            raise ValueError(
                f"domain {domain.name!r} has {len(domain.train_labels)} training samples, "
                f"fewer than clients_per_domain={clients_per_domain}"
            )


def _shards(domain: int, parts: Sequence[np.ndarray]) -> list[ClientShard]:
    return [ClientShard(domain, np.sort(part).astype(np.int64)) for part in parts]


def partition_feature_skew(
    domains: Sequence[DomainData], clients_per_domain: int, rng: np.random.Generator
) -> list[ClientShard]:
    """Split each domain IID into ``clients_per_domain`` near-equal shards (sizes differ by at most one).

    Parameters
    ----------
    domains : sequence of DomainData
        Domains to split.
    clients_per_domain : int
        Clients per domain, at least 1 (1: each client holds a whole domain, as the paper).
    rng : numpy.random.Generator
        Source of the shuffling.

    Returns
    -------
    list of ClientShard
        Domain-major: client ``i`` belongs to domain ``i // clients_per_domain``.
    """
    _check_clients(domains, clients_per_domain)
    shards = []
    for position, domain in enumerate(domains):
        order = rng.permutation(len(domain.train_labels))
        shards += _shards(position, np.array_split(order, clients_per_domain))
    return shards


def _dirichlet_split(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: each class's indices cut among the clients by Dirichlet(alpha) proportions."""
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(clients, alpha))  # (clients,)
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.concatenate(pieces) for pieces in parts]


def _dirichlet_domain(
    domain: DomainData, clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Redraw the Dirichlet split of one domain until every client has ``min_samples``."""
    labels = np.asarray(domain.train_labels)
    if clients * min_samples <= len(labels):
        for _ in range(_MAX_DIRICHLET_ATTEMPTS):
            parts = _dirichlet_split(labels, clients, alpha, rng)
            if min(len(part) for part in parts) >= min_samples:
                return parts
    raise ValueError(
        f"min_samples={min_samples} is too large for domain {domain.name!r} ({len(labels)} samples, "
        f"{clients} clients, alpha={alpha}): no split in {_MAX_DIRICHLET_ATTEMPTS} draws; lower min_samples "
        "or raise alpha"
    )


def partition_dirichlet(
    domains: Sequence[DomainData],
    clients_per_domain: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
) -> list[ClientShard]:
    """Split each domain among clients with Dirichlet(alpha) label skew (feature + label skew).

    Within a domain, every class's samples are divided among the domain's clients in
    proportions drawn from Dirichlet(alpha); the whole draw is repeated until every
    client has at least ``min_samples`` samples. Small ``alpha`` gives strongly skewed
    label distributions, large ``alpha`` nearly IID ones. The paper uses alpha 0.5 and
    5 clients per domain.

    Parameters
    ----------
    domains : sequence of DomainData
        Domains to split.
    clients_per_domain : int
        Clients per domain, at least 1.
    alpha : float
        Dirichlet concentration, positive.
    min_samples : int
        Fewest samples any client may get, at least 0.
    rng : numpy.random.Generator
        Source of the shuffling and proportions.

    Returns
    -------
    list of ClientShard
        Domain-major: client ``i`` belongs to domain ``i // clients_per_domain``; the
        shards of a domain cover its train set exactly once.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_samples < 0:
        raise ValueError(f"min_samples must be at least 0, got {min_samples}")
    _check_clients(domains, clients_per_domain)
    shards = []
    for position, domain in enumerate(domains):
        parts = _dirichlet_domain(domain, clients_per_domain, alpha, min_samples, rng)
        shards += _shards(position, parts)
        logger.debug("domain %s: client sizes %s", domain.name, [len(part) for part in parts])
    return shards


def stratified_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of a random subset of ``size`` items holding every class in proportion.

    Each class gets ``size`` times its share, rounded down, and the items left over
    go to the classes with the largest remainders; the members are drawn at random.

    Parameters
    ----------
    labels : numpy.ndarray
        (N,) label of each item, in the dataset's order.
    size : int
        How many items to keep; all of them when ``size >= N``.
    rng : numpy.random.Generator
        Draws the members of each class.

    Returns
    -------
    numpy.ndarray
        Ascending positions into ``labels``.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(labels)
    take = np.floor(quota).astype(int)
    largest_remainders = np.argsort(-(quota - take), kind="stable")
    take[largest_remainders[: size - int(take.sum())]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picks))
