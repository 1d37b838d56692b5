"""Backbone cache: atomic writing, reading only the needed tensors, numerics, errors."""

import json
from pathlib import Path

import pytest
import torch

from fedra_core.backbone import BackboneCacheError, assemble, import_timm, read_meta, write_cache


def test_meta_describes_the_backbone(tiny_vit_cache: Path) -> None:
    meta = read_meta(tiny_vit_cache)
    assert meta.timm_name == "vit_tiny_patch16_224"
    assert meta.num_layers == 6 and meta.image_size == 16


def test_submodel_reads_only_its_tensors(tiny_vit_cache: Path) -> None:
    _, full = assemble(tiny_vit_cache, None, num_classes=5)
    _, sub = assemble(tiny_vit_cache, [1, 4], num_classes=5)
    block_keys = [k for k in full.keys_read if k.startswith("blocks.")]
    shared = [k for k in full.keys_read if not k.startswith("blocks.")]
    per_block = len(block_keys) // 6
    assert sub.tensors_read == len(shared) + 2 * per_block
    assert {k.split(".")[1] for k in sub.keys_read if k.startswith("blocks.")} == {"1", "4"}
    assert not any(k.startswith("head.") for k in full.keys_read)
    assert sub.bytes_read < full.bytes_read / 2


def test_submodel_matches_full_model_blocks(tiny_vit_cache: Path) -> None:
    full, _ = assemble(tiny_vit_cache, None, num_classes=5)
    sub, _ = assemble(tiny_vit_cache, [2, 5], num_classes=5)
    tokens = torch.randn(3, 17, 32)  # (B, 1 + 16 patches, C)
    with torch.no_grad():
        expected = full.blocks[5](full.blocks[2](tokens))
        assert torch.allclose(sub.blocks(tokens), expected, atol=1e-6)
        assert torch.allclose(sub.patch_embed(torch.ones(1, 3, 16, 16)), full.patch_embed(torch.ones(1, 3, 16, 16)))
    assert list(sub.state_dict())[4].startswith("blocks.2.")  # global names, no mapping


def test_submodel_runs_end_to_end(tiny_vit_cache: Path) -> None:
    sub, _ = assemble(tiny_vit_cache, [0, 3, 4], num_classes=9)
    assert sub(torch.randn(2, 3, 16, 16)).shape == (2, 9)
    assert not any(p.is_meta for p in sub.parameters())


@pytest.mark.parametrize("layers", [[], [3, 1], [1, 1], [6], [-1]])
def test_bad_layers(tiny_vit_cache: Path, layers: list[int]) -> None:
    with pytest.raises(ValueError):
        assemble(tiny_vit_cache, layers, num_classes=2)


def test_missing_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneCacheError, match="no backbone cache"):
        assemble(tmp_path / "nope", [0], num_classes=2)


def test_corrupt_meta_is_a_clear_error(tiny_vit_cache: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "backbone.safetensors").write_bytes((tiny_vit_cache / "backbone.safetensors").read_bytes())
    (broken / "meta.json").write_text(json.dumps({"timm_name": "x"}))
    with pytest.raises(BackboneCacheError, match="not a valid"):
        read_meta(broken)


def test_second_writer_keeps_the_first_cache(tiny_vit_cache: Path, tmp_path: Path) -> None:
    timm = import_timm()
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    target = tmp_path / "cache"
    write_cache(model, "vit_tiny_patch16_224", kwargs, target)
    write_cache(model, "vit_tiny_patch16_224", {**kwargs, "depth": 2}, target)  # already there: kept
    assert read_meta(target).num_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary left behind


def test_mlp_mixer_is_supported(tmp_path: Path) -> None:
    timm = import_timm()
    model = timm.create_model("mixer_s32_224", img_size=64, num_classes=3)
    write_cache(model, "mixer_s32_224", {"img_size": 64}, tmp_path / "mixer")
    sub, stats = assemble(tmp_path / "mixer", [0, 7], num_classes=4)
    assert sub(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert {k.split(".")[1] for k in stats.keys_read if k.startswith("blocks.")} == {"0", "7"}


def test_model_without_blocks_is_rejected(tmp_path: Path) -> None:
    timm = import_timm()
    model = timm.create_model("resnet10t", num_classes=2)
    with pytest.raises(BackboneCacheError, match="nn.Sequential named 'blocks'"):
        write_cache(model, "resnet10t", {}, tmp_path / "resnet")
