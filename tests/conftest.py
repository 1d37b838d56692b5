"""Shared fixtures: tiny real timm backbones written to real cache folders."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedra_core.backbone import import_timm, write_cache  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per pytest-xdist worker: two workers with a thread per core each would oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 6, "num_heads": 2, "mlp_ratio": 2.0}


@pytest.fixture(scope="session")
def tiny_vit_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block ViT (dim 32, 16x16 inputs) in a backbone cache."""
    import torch

    timm = import_timm()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=7, **TINY_VIT)
    cache = tmp_path_factory.mktemp("backbones") / "tiny-vit"
    write_cache(model, "vit_tiny_patch16_224", TINY_VIT, cache)
    return cache


# The slowest modules first (each starts real Flower servers, test_compose.py containers), the
# others in their usual order: with `make test`'s two pytest-xdist workers (--dist loadfile
# --no-loadscope-reorder) the long ones start at once and the short ones fill in after.
SLOW_FIRST = ["test_compose.py", "test_deployment.py", "test_resume.py", "test_federated_eval.py", "test_hetero.py",
              "test_compare.py", "test_simulation.py", "test_hostile.py", "test_worker.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: tests keep their order within a module
