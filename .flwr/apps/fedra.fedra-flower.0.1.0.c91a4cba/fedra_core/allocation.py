"""Allocation matrices: which transformer blocks each client holds in a round."""

from collections.abc import Sequence

import numpy as np

METHODS = ("fedra", "fedra-cover", "first")


def _check_capacities(capacities: Sequence[int], num_layers: int) -> list[int]:
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    checked = []
    for client, capacity in enumerate(capacities):
        if int(capacity) != capacity or not 1 <= capacity <= num_layers:
            raise ValueError(
                f"client {client}: capacity {capacity!r} is outside 1..{num_layers} "
                f"(the backbone has {num_layers} blocks)"
            )
        checked.append(int(capacity))
    return checked


def _allocate_fedra(caps: list[int], num_layers: int, rng: np.random.Generator) -> np.ndarray:
    matrix = np.zeros((len(caps), num_layers), dtype=bool)
    for row, k in enumerate(caps):
        matrix[row, rng.choice(num_layers, size=k, replace=False)] = True
    return matrix


def _allocate_cover(caps: list[int], num_layers: int, rng: np.random.Generator) -> np.ndarray:
    """Random rows that together hold every block, when the capacities allow it.

    Blocks are dealt in a random order to the clients in a random order, each client
    taking one block per turn while it has room, so every block is dealt once before
    any block is dealt twice. The remaining room of each client is then filled with
    blocks drawn uniformly from those it does not hold yet.
    """
    if sum(caps) < num_layers:
        return _allocate_fedra(caps, num_layers, rng)
    matrix = np.zeros((len(caps), num_layers), dtype=bool)
    room = np.array(caps)
    turn_order = rng.permutation(len(caps))
    turn = 0
    for block in rng.permutation(num_layers):
        while room[turn_order[turn % len(caps)]] == 0:
            turn += 1
        client = turn_order[turn % len(caps)]
        matrix[client, block] = True
        room[client] -= 1
        turn += 1
    for client in range(len(caps)):
        free = np.flatnonzero(~matrix[client])
        matrix[client, rng.choice(free, size=room[client], replace=False)] = True
    return matrix


def _allocate_first(caps: list[int], num_layers: int) -> np.ndarray:
    return np.arange(num_layers)[None, :] < np.array(caps)[:, None]


def allocate(
    capacities: Sequence[int],
    num_layers: int,
    rng: np.random.Generator,
    method: str = "fedra",
) -> np.ndarray:
    """Draw the allocation matrix of one round.

    Parameters
    ----------
    capacities : Sequence[int]
        Number of blocks each client can hold, one entry per client (row).
    num_layers : int
        Number of transformer blocks of the backbone.
    rng : numpy.random.Generator
        Source of randomness; the same generator state gives the same matrix.
    method : str
        ``"fedra"`` (each row uniform without replacement, as the paper),
        ``"fedra-cover"`` (every block held by some client whenever the capacities
        sum to at least ``num_layers``) or ``"first"`` (blocks ``0..k_i-1``).

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``(len(capacities), num_layers)``; row ``i`` has
        exactly ``capacities[i]`` True entries.
    """
    caps = _check_capacities(capacities, num_layers)
    if method == "fedra":
        return _allocate_fedra(caps, num_layers, rng)
    if method == "fedra-cover":
        return _allocate_cover(caps, num_layers, rng)
    if method == "first":
        return _allocate_first(caps, num_layers)
    raise ValueError(f"unknown allocation method {method!r}; expected one of {METHODS}")


def layers_of(matrix: np.ndarray, row: int) -> list[int]:
    """Global indices of the blocks held by client ``row``, ascending."""
    return [int(i) for i in np.flatnonzero(matrix[row])]
