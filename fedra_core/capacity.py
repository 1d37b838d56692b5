"""How many transformer blocks fit in a device's memory budget, read from the cache's safetensors header."""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from fedra_core.backbone import BLOCK_PREFIX, WEIGHTS_FILE, BackboneCacheError

MB = 1024 * 1024


@dataclass(frozen=True)
class BackboneSizes:
    """Bytes of the frozen weights: per block (by global index) and the shared parts."""

    blocks: dict[int, int]
    shared: int

    def bytes_for(self, num_blocks: int) -> int:
        """Shared parts plus the ``num_blocks`` largest blocks: any sub-model of that depth fits."""
        largest = sorted(self.blocks.values(), reverse=True)[:num_blocks]
        return self.shared + sum(largest)


def tensor_sizes(weights_file: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header only (no tensor is read).

    Parameters
    ----------
    weights_file : Path
        A ``.safetensors`` file: an 8-byte little-endian header length, then a JSON
        header mapping each tensor name to its dtype, shape and ``data_offsets``.

    Returns
    -------
    dict[str, int]
        Tensor name -> size in bytes.
    """
    try:
        with open(weights_file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise BackboneCacheError(f"cannot read the safetensors header of {weights_file}: {err}") from err
    header.pop("__metadata__", None)
    return {name: int(info["data_offsets"][1]) - int(info["data_offsets"][0]) for name, info in header.items()}


def backbone_sizes(cache_dir: Path) -> BackboneSizes:
    """Per-block and shared bytes of the backbone in a cache directory."""
    blocks: dict[int, int] = {}
    shared = 0
    for name, size in tensor_sizes(Path(cache_dir) / WEIGHTS_FILE).items():
        if name.startswith(BLOCK_PREFIX):
            index = int(name[len(BLOCK_PREFIX):].split(".", 1)[0])  # blocks.7.attn... -> 7
            blocks[index] = blocks.get(index, 0) + size
        else:
            shared += size
    if not blocks:
        raise BackboneCacheError(f"{cache_dir}: the backbone weights hold no '{BLOCK_PREFIX}N.' tensors")
    return BackboneSizes(blocks, shared)


def layers_for_budget(budget_mb: float, sizes: BackboneSizes) -> int:
    """The most blocks whose frozen weights, with the shared parts, fit in ``budget_mb`` MiB.

    The budget covers the weights a client's sub-model loads (its blocks plus the
    embedding and final norm). Activations, LoRA adapters and optimizer state come
    on top of that and grow with the batch size: give the budget that the weights
    may take, not the whole device.

    Parameters
    ----------
    budget_mb : float
        Memory for the backbone weights, in MiB.
    sizes : BackboneSizes
        The backbone's per-block and shared bytes (``backbone_sizes``).

    Returns
    -------
    int
        A number of blocks between 1 and the backbone's depth; ``ValueError`` when
        not even one block fits.
    """
    budget = float(budget_mb) * MB
    fitting = [k for k in range(1, len(sizes.blocks) + 1) if sizes.bytes_for(k) <= budget]
    if not fitting:
        raise ValueError(f"memory-budget-mb={budget_mb} cannot hold one block: the shared parts and one block "
                         f"need {sizes.bytes_for(1) / MB:.3f} MiB")
    return max(fitting)
