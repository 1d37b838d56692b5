"""A device's memory budget turned into max-layers from the backbone cache's safetensors header."""

from pathlib import Path

import pytest
from safetensors import safe_open

from fedra_core.capacity import MB, BackboneSizes, backbone_sizes, layers_for_budget, tensor_sizes
from fedra_core.config import ConfigError, experiment_from_dict, resolve_node


def _sizes_by_reading_tensors(cache: Path) -> tuple[dict[int, int], int]:
    blocks: dict[int, int] = {}
    shared = 0
    with safe_open(str(cache / "backbone.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            size = tensor.numel() * tensor.element_size()
            if name.startswith("blocks."):
                index = int(name.split(".")[1])
                blocks[index] = blocks.get(index, 0) + size
            else:
                shared += size
    return blocks, shared


def test_header_sizes_match_the_tensors(tiny_vit_cache: Path) -> None:
    blocks, shared = _sizes_by_reading_tensors(tiny_vit_cache)

    sizes = backbone_sizes(tiny_vit_cache)

    assert sizes.blocks == blocks and sizes.shared == shared
    assert sorted(sizes.blocks) == list(range(6))
    assert sum(tensor_sizes(tiny_vit_cache / "backbone.safetensors").values()) == sum(blocks.values()) + shared


def test_budget_gives_the_most_blocks_that_fit() -> None:
    sizes = BackboneSizes(blocks={0: 3 * MB, 1: 3 * MB, 2: 3 * MB, 3: 3 * MB}, shared=MB)

    assert layers_for_budget(7, sizes) == 2  # 1 + 3 + 3
    assert layers_for_budget(9.99, sizes) == 2
    assert layers_for_budget(10, sizes) == 3
    assert layers_for_budget(1000, sizes) == 4  # never more than the depth
    with pytest.raises(ValueError, match="memory-budget-mb=3.5 cannot hold one block"):
        layers_for_budget(3.5, sizes)


def test_uneven_blocks_count_the_largest_first() -> None:
    sizes = BackboneSizes(blocks={0: 1 * MB, 1: 4 * MB, 2: 1 * MB}, shared=0)

    assert layers_for_budget(4, sizes) == 1  # any 1-block sub-model, even block 1, fits
    assert layers_for_budget(5, sizes) == 2


def test_node_config_budget_sets_or_caps_max_layers(tiny_vit_cache: Path) -> None:
    experiment = experiment_from_dict({"backbone": {"cache": str(tiny_vit_cache)},
                                       "clients": {"capacities": [6, 6]}})
    sizes = backbone_sizes(tiny_vit_cache)
    budget = sizes.bytes_for(4) / MB  # exactly four blocks

    assert resolve_node(experiment, {"partition-id": 0, "memory-budget-mb": budget}).max_layers == 4
    assert resolve_node(experiment, {"partition-id": 0, "memory-budget-mb": budget, "max-layers": 2}).max_layers == 2
    assert resolve_node(experiment, {"partition-id": 0, "memory-budget-mb": budget, "max-layers": 5}).max_layers == 4
    with pytest.raises(ConfigError, match="memory-budget-mb=-1 is not a positive number"):
        resolve_node(experiment, {"partition-id": 0, "memory-budget-mb": -1})
    with pytest.raises(ConfigError, match="cannot hold one block"):
        resolve_node(experiment, {"partition-id": 0, "memory-budget-mb": 0.0001})
