"""Masked averaging: each key is averaged over the clients whose delta holds it."""

from collections.abc import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


def masked_average(
    global_state: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> State:
    """Add to every global tensor the mean delta of the clients that trained it.

    Parameters
    ----------
    global_state : Mapping[str, Tensor]
        The current global trainable state, keyed by global names.
    deltas : Sequence[Mapping[str, Tensor]]
        One mapping per client: trained minus received, for the keys it trained.
    weights : Sequence[float], optional
        One non-negative weight per client (e.g. its number of examples). ``None``
        counts every client equally, as the paper does. The weights of the clients
        holding a key are normalized per key, so a block held by few clients is
        not shrunk.

    Returns
    -------
    dict[str, Tensor]
        A new state; keys that no delta holds keep their global value. The inputs
        are not modified.
    """
    if weights is None:
        weights = [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights for {len(deltas)} deltas")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative, got {list(weights)}")
    for i, delta in enumerate(deltas):
        unknown = set(delta) - set(global_state)
        if unknown:
            raise KeyError(f"delta {i} has keys not in the global state: {sorted(unknown)[:5]}")

    new_state: State = {}
    for key, value in global_state.items():
        holders = [(d[key], w) for d, w in zip(deltas, weights) if key in d and w > 0]
        if not holders:
            new_state[key] = value.clone()
            continue
        total = sum(w for _, w in holders)
        acc = torch.zeros_like(value, dtype=torch.float32)
        for delta, w in holders:
            acc.add_(delta.to(device=value.device, dtype=torch.float32), alpha=w / total)
        new_state[key] = (value.float() + acc).to(value.dtype)
    return new_state


class InvalidReply(ValueError):
    """A client's reply cannot be aggregated; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_delta(delta: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> None:
    """Raise ``InvalidReply`` unless ``delta`` has exactly the sent keys, shapes and finite values."""
    missing = sorted(set(sent) - set(delta))
    extra = sorted(set(delta) - set(sent))
    if missing or extra:
        raise InvalidReply(f"keys differ from those sent: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected {extra[:3]} ({len(extra)})")
    for key, value in delta.items():
        if tuple(value.shape) != tuple(sent[key].shape):
            raise InvalidReply(f"{key}: shape {tuple(value.shape)}, sent {tuple(sent[key].shape)}")
        if not value.is_floating_point():
            raise InvalidReply(f"{key}: dtype {value.dtype} is not floating point")
        if not bool(torch.isfinite(value).all()):
            raise InvalidReply(f"{key}: contains NaN or infinite values")


def is_finite_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True when no tensor of ``state`` holds NaN or an infinity."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def clip_delta(delta: Mapping[str, torch.Tensor], max_norm: float | None) -> tuple[State, float]:
    """Scale a client's whole delta down to L2 norm ``max_norm`` (all its tensors together).

    Clipping bounds how far one client can move the global state in one round, so a
    poisoned or diverged update cannot blow it up; it does not stop a client from
    steering the state within that bound, round after round.

    Parameters
    ----------
    delta : Mapping[str, Tensor]
        One client's delta, keyed by global names.
    max_norm : float or None
        The largest norm kept; ``None`` returns the delta unchanged.

    Returns
    -------
    tuple[dict[str, Tensor], float]
        The (possibly scaled) delta and its norm before clipping.
    """
    squares = sum((v.double() ** 2).sum() for v in delta.values())
    norm = float(torch.as_tensor(squares).sqrt())
    if max_norm is None or norm <= max_norm:
        return dict(delta), norm
    scale = max_norm / norm
    return {k: v * scale for k, v in delta.items()}, norm
