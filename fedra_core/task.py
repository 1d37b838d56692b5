"""A server's train task, read as untrusted input by the node before it does any work."""

from collections.abc import Mapping, Sequence
from typing import Any

from fedra_core.config import Experiment, NodeSettings, TaskRefused
from fedra_core.wire import WireError, check_array_meta


def max_task_blocks(experiment: Experiment, node: NodeSettings, num_layers: int) -> int:
    """Most blocks this node trains: its own limit always; the method may lift only the experiment's.

    In simulation a partition's capacity comes from the experiment, and the ``all-large``
    ceiling sends every block. A node whose own node-config sets ``max-layers`` or
    ``memory-budget-mb`` is never sent more, whatever the method.
    """
    from fedra_core.baselines import max_blocks

    allowed = max_blocks(experiment, node.max_layers, num_layers)
    return min(allowed, node.own_max_layers) if node.own_max_layers is not None else allowed


def check_layers(raw: Any, num_layers: int, limit: int) -> list[int]:
    """The task's ``layers``: distinct ascending block indices in ``0..num_layers-1``, at most ``limit``.

    Raises
    ------
    TaskRefused
        Naming what is wrong with the list.
    """
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TaskRefused(f"the task's layers must be a list of block indices, got {type(raw).__name__}")
    layers = list(raw)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise TaskRefused(f"the task's layers must be a non-empty list of integers, got {layers[:8]!r}")
    if any(not 0 <= i < num_layers for i in layers):
        raise TaskRefused(f"the task's layers {layers} are outside 0..{num_layers - 1}")
    if layers != sorted(set(layers)):
        raise TaskRefused(f"the task's layers {layers} are not distinct and ascending")
    if len(layers) > limit:
        raise TaskRefused(f"the server sent {len(layers)} blocks but this node holds at most {limit}")
    return layers


def check_received(arrays: Mapping[str, tuple[str, Sequence[int], int]], layers: Sequence[int],
                   wire_dtype: str) -> None:
    """Check the received arrays' metadata before decoding them.

    Parameters
    ----------
    arrays : Mapping[str, tuple[str, Sequence[int], int]]
        Name -> (dtype, shape, serialized bytes) of every received array.
    layers : Sequence[int]
        The blocks of the task: a block tensor of another block is refused.
    wire_dtype : str
        The wire dtype the task names.
    """
    from fedra_core.lora import block_of  # peft: imported only where a node trains

    held = set(layers)
    for name, (dtype, shape, nbytes) in arrays.items():
        block = block_of(name)
        if block is not None and block not in held:
            raise TaskRefused(f"the task sends {name} of block {block}, which is not among its layers")
        try:
            check_array_meta(name, dtype, shape, nbytes, None, wire_dtype)
        except WireError as err:
            raise TaskRefused(f"the task's arrays: {err}") from err
