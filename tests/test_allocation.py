"""Allocation matrices: row sums, uniformity, coverage, depth-first, errors, determinism."""

import numpy as np
import pytest

from fedra_core.allocation import allocate, layers_of

CAPS = [12, 10, 8, 6, 4, 3]


@pytest.mark.parametrize("method", ["fedra", "fedra-cover", "first"])
def test_rows_hold_exactly_their_capacity(method: str) -> None:
    matrix = allocate(CAPS, 12, np.random.default_rng(0), method=method)
    assert matrix.shape == (6, 12) and matrix.dtype == bool
    assert matrix.sum(axis=1).tolist() == CAPS


def test_fedra_block_frequency_is_k_over_l() -> None:
    rng = np.random.default_rng(1)
    draws = np.stack([allocate([3, 6], 12, rng) for _ in range(4000)])  # (T, 2, 12)
    freq = draws.mean(axis=0)
    assert np.allclose(freq[0], 3 / 12, atol=0.03)
    assert np.allclose(freq[1], 6 / 12, atol=0.03)


def test_fedra_does_not_enforce_coverage() -> None:
    rng = np.random.default_rng(2)
    uncovered = sum((~allocate([3] * 4, 12, rng).any(axis=0)).any() for _ in range(200))
    assert uncovered > 0  # the paper's default allows blocks held by nobody


def test_cover_holds_every_block_when_capacities_allow() -> None:
    rng = np.random.default_rng(3)
    for _ in range(500):
        assert allocate([3] * 4, 12, rng, method="fedra-cover").any(axis=0).all()
        assert allocate([5, 4, 3], 12, rng, method="fedra-cover").any(axis=0).all()


def test_cover_rows_stay_random() -> None:
    rng = np.random.default_rng(4)
    draws = np.stack([allocate([3, 3, 3, 3], 12, rng, method="fedra-cover") for _ in range(3000)])
    assert np.allclose(draws.mean(axis=0), 0.25, atol=0.04)


def test_cover_with_too_little_room_still_fills_rows() -> None:
    matrix = allocate([2, 2], 12, np.random.default_rng(5), method="fedra-cover")
    assert matrix.sum(axis=1).tolist() == [2, 2]


def test_first_is_depth_based() -> None:
    matrix = allocate([3, 1, 12], 12, np.random.default_rng(0), method="first")
    assert layers_of(matrix, 0) == [0, 1, 2]
    assert layers_of(matrix, 1) == [0]
    assert layers_of(matrix, 2) == list(range(12))


@pytest.mark.parametrize("bad", [0, 13, -1, 2.5])
def test_bad_capacity_names_the_client(bad: float) -> None:
    with pytest.raises(ValueError, match="client 1"):
        allocate([3, bad, 4], 12, np.random.default_rng(0))


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown allocation method"):
        allocate([3], 12, np.random.default_rng(0), method="random")


@pytest.mark.parametrize("method", ["fedra", "fedra-cover"])
def test_same_generator_state_same_matrix(method: str) -> None:
    a = allocate(CAPS, 12, np.random.default_rng(42), method=method)
    b = allocate(CAPS, 12, np.random.default_rng(42), method=method)
    c = allocate(CAPS, 12, np.random.default_rng(43), method=method)
    assert (a == b).all() and not (a == c).all()


def test_layers_of_is_ascending() -> None:
    matrix = allocate(CAPS, 12, np.random.default_rng(7))
    for row in range(len(CAPS)):
        layers = layers_of(matrix, row)
        assert layers == sorted(layers) and len(layers) == CAPS[row]
