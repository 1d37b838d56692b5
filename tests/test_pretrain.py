"""The built-in backbones: random-depth and stochastic-depth pretraining, caches that know their recipe."""

import json
from pathlib import Path

import pytest
import torch

from fedra_core import pretrain
from fedra_core.backbone import assemble, import_timm, read_meta

TINY_RECIPE = {
    "timm_name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 24, "patch_size": 8, "embed_dim": 16, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0},
    "num_images": 256,
    "epochs": 1,
    "batch_size": 64,
    "lr": 2e-3,
    "random_depth": 0.5,
}


@pytest.fixture
def tiny_recipe(monkeypatch: pytest.MonkeyPatch) -> dict:
    recipe = json.loads(json.dumps(TINY_RECIPE))
    monkeypatch.setitem(pretrain.RECIPES, "tiny-test", recipe)
    return recipe


def test_random_blocks_are_an_ordered_subset_of_every_depth() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = [pretrain.random_blocks(12, generator) for _ in range(400)]
    for blocks in draws:
        assert blocks == sorted(set(blocks)) and 0 <= blocks[0] and blocks[-1] < 12
    assert {len(b) for b in draws} == set(range(1, 13))  # depth uniform over 1..12
    assert any(0 not in b for b in draws)  # the first block is skipped too, like any other


def test_forward_blocks_runs_only_the_listed_blocks_and_restores_the_model() -> None:
    timm = import_timm()
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_RECIPE["kwargs"]).eval()
    images = torch.randn(2, 3, 24, 24)
    blocks = model.blocks
    with torch.no_grad():
        assert torch.equal(pretrain.forward_blocks(model, images, [0, 1, 2, 3]), model(images))
        shallow = pretrain.forward_blocks(model, images, [1, 3])
        model.blocks = torch.nn.Sequential(blocks[1], blocks[3])
        expected = model(images)
    model.blocks = blocks
    assert torch.equal(shallow, expected)
    assert pretrain.forward_blocks(model, images, [2]).shape == (2, 3)
    assert model.blocks is blocks


def test_builtin_cache_is_built_once_and_rebuilt_when_the_recipe_changes(tiny_recipe: dict, tmp_path: Path) -> None:
    cache = tmp_path / "backbones" / "tiny"
    meta = pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0)
    assert meta.source == pretrain.recipe_source("tiny-test", 0) and meta.num_layers == 4
    weights = cache / "backbone.safetensors"
    built = weights.stat().st_mtime_ns
    assert pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0) == meta
    assert weights.stat().st_mtime_ns == built  # reused, not rebuilt

    tiny_recipe["random_depth"] = 0.0  # a new recipe version: the old cache is stale
    rebuilt = pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0)
    assert rebuilt.source != meta.source and rebuilt.source == pretrain.recipe_source("tiny-test", 0)
    assert read_meta(cache) == rebuilt
    assert sorted(p.name for p in cache.parent.iterdir() if not p.name.endswith(".lock")) == ["tiny"]
    model, _ = assemble(cache, [0, 2], num_classes=5)
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 5)


def test_cache_from_before_recipes_were_recorded_is_rebuilt(tiny_recipe: dict, tmp_path: Path) -> None:
    cache = tmp_path / "tiny"
    pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0)
    meta_file = cache / "meta.json"
    old = json.loads(meta_file.read_text())
    del old["source"]  # what earlier versions wrote
    meta_file.write_text(json.dumps(old))
    assert read_meta(cache).source == ""
    assert pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0).source == pretrain.recipe_source("tiny-test", 0)


def test_another_backbone_in_the_cache_folder_is_never_overwritten(tiny_recipe: dict, tmp_path: Path) -> None:
    from fedra_core.backbone import BackboneCacheError, write_cache

    timm = import_timm()
    model = timm.create_model("vit_tiny_patch16_224", **TINY_RECIPE["kwargs"])
    cache = tmp_path / "mine"
    write_cache(model, "vit_tiny_patch16_224", TINY_RECIPE["kwargs"], cache, source="timm:vit_tiny:pretrained")
    before = (cache / "backbone.safetensors").read_bytes()
    with pytest.raises(BackboneCacheError, match="holds another backbone .timm:vit_tiny:pretrained."):
        pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0)
    assert (cache / "backbone.safetensors").read_bytes() == before


def test_every_builtin_backbone_name_has_a_recipe_with_its_own_digest() -> None:
    from fedra_core.config import BUILTIN_BACKBONES

    assert set(BUILTIN_BACKBONES) == set(pretrain.RECIPES)
    sources = {pretrain.recipe_source(name, 0) for name in BUILTIN_BACKBONES}
    assert len(sources) == len(BUILTIN_BACKBONES)
    random_depth, stochastic = pretrain.RECIPES["digits-vit"], pretrain.RECIPES["digits-vit-sd"]
    assert random_depth["random_depth"] == 0.5 and "drop_path_rate" not in random_depth
    assert stochastic["drop_path_rate"] == 0.1 and stochastic.get("random_depth", 0.0) == 0.0
    same = {key: value for key, value in stochastic.items() if key != "drop_path_rate"}
    assert same == {key: value for key, value in random_depth.items() if key != "random_depth"}


def test_stochastic_depth_recipe_never_runs_a_sub_model_and_caches_the_plain_model(
        tiny_recipe: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    del tiny_recipe["random_depth"]
    tiny_recipe["drop_path_rate"] = 0.3

    def no_sub_models(*args: object) -> None:
        raise AssertionError("the stochastic-depth recipe ran a random sub-model")

    trained = []
    build = pretrain.pretrain
    monkeypatch.setattr(pretrain, "forward_blocks", no_sub_models)
    monkeypatch.setattr(pretrain, "pretrain", lambda *args: trained.append(build(*args)) or trained[-1])
    cache = tmp_path / "tiny-sd"
    meta = pretrain.ensure_builtin_backbone(cache, "tiny-test", seed=0)
    assert meta.source == pretrain.recipe_source("tiny-test", 0)
    drop = [getattr(block.drop_path1, "drop_prob", 0.0) for block in trained[0].blocks]  # rate 0: Identity
    assert drop[0] == 0.0 and drop[-1] == pytest.approx(0.3)  # timm's linear rule over the blocks
    assert "drop_path_rate" not in read_meta(cache).kwargs  # tuning runs without stochastic depth
    model, _ = assemble(cache, [0, 1, 2, 3], num_classes=5)
    drop_path = import_timm().layers.DropPath
    assert any(isinstance(m, drop_path) for m in trained[0].modules())
    assert not any(isinstance(m, drop_path) for m in model.modules())
