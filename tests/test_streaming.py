"""Streamed full-depth evaluation: the in-memory model's logits, each block read once, one block alive."""

import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import TensorDataset

from fedra_core import backbone, streaming
from fedra_core.backbone import WEIGHTS_FILE
from fedra_core.config import LoraSettings
from fedra_core.evaluation import GlobalModel
from fedra_core.lora import StateMismatchError, load_trainable_state
from fedra_core.streaming import StreamedGlobalModel, stream_evaluate, stream_logits, without_exits

NUM_CLASSES = 5
SEED = 3
LORA = LoraSettings(rank=4, target_modules=("attn.proj", "mlp.fc2"))


def _random_state(model: GlobalModel) -> dict[str, torch.Tensor]:
    """A non-trivial global state: every LoRA A and B and the head drawn at random (B is zero at init)."""
    generator = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=generator) * 0.3 for k, v in model.initial_state().items()}


def _in_memory_logits(model: GlobalModel, state: dict, images: torch.Tensor) -> torch.Tensor:
    load_trainable_state(model.model, state)
    with torch.no_grad():
        return model.model.eval()(images)  # (N, NUM_CLASSES)


@pytest.fixture(scope="module")
def reference(tiny_vit_cache: Path) -> tuple[GlobalModel, dict[str, torch.Tensor]]:
    """The in-memory full model with LoRA on the blocks' attn.proj and mlp.fc2, and a random state."""
    model = GlobalModel.with_lora(tiny_vit_cache, NUM_CLASSES, LORA, seed=SEED)
    return model, _random_state(model)


@pytest.mark.parametrize("targets, train_head", [(("attn.proj", "mlp.fc2"), True), (("proj", "mlp.fc2"), False)])
def test_streamed_logits_equal_the_in_memory_model(tiny_vit_cache: Path, targets: tuple, train_head: bool) -> None:
    # Prepare: LoRA on the blocks (and, with "proj", on the shared patch embedding too)
    lora = LoraSettings(rank=4, alpha=8, dropout=0.1, target_modules=targets, train_head=train_head)
    model = GlobalModel.with_lora(tiny_vit_cache, NUM_CLASSES, lora, seed=SEED)
    state = _random_state(model)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    expected = _in_memory_logits(model, state, images)

    # Execute: 10 images in batches of 4, so blocks see partial batches too
    logits = stream_logits(tiny_vit_cache, state, images, lora, NUM_CLASSES, batch_size=4, seed=SEED)

    # Assert
    assert logits.shape == (10, NUM_CLASSES)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
    assert expected.std() > 0.1  # the adapters and head really move the logits


def test_shallow_model_of_listed_layers_equals_in_memory(tiny_vit_cache: Path) -> None:
    layers = [0, 2, 3]  # a shallow global model (all-small's holds the first blocks)
    model = GlobalModel.with_lora(tiny_vit_cache, NUM_CLASSES, LORA, seed=SEED, layers=layers)
    state = _random_state(model)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    logits = stream_logits(tiny_vit_cache, state, images, LORA, NUM_CLASSES, batch_size=4, seed=SEED, layers=layers)

    assert torch.allclose(logits, _in_memory_logits(model, state, images), atol=1e-5, rtol=0)

    with pytest.raises(StateMismatchError, match="blocks \\[3\\]"):  # this state on a 2-block model
        stream_logits(tiny_vit_cache, state, images, LORA, NUM_CLASSES, seed=SEED, layers=[0, 2])
    missing = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.lora_B.weight"}
    with pytest.raises(StateMismatchError, match="missing"):
        stream_logits(tiny_vit_cache, missing, images, LORA, NUM_CLASSES, seed=SEED, layers=layers)


def test_evaluate_matches_global_model_on_every_test_set(tiny_vit_cache: Path, reference: tuple) -> None:
    model, state = reference
    generator = torch.Generator().manual_seed(5)
    sets = {name: TensorDataset(torch.randn(n, 3, 16, 16, generator=generator),
                                torch.randint(0, NUM_CLASSES, (n,), generator=generator))
            for name, n in (("clean", 9), ("noisy", 5))}
    expected = model.evaluate(state, sets, batch_size=4)

    results = StreamedGlobalModel(tiny_vit_cache, NUM_CLASSES, LORA, seed=SEED).evaluate(state, sets, batch_size=4)
    single = stream_evaluate(tiny_vit_cache, state, sets["noisy"], LORA, NUM_CLASSES, batch_size=2, seed=SEED)

    assert list(results) == ["clean", "noisy"]
    for name in sets:
        assert results[name]["num_examples"] == expected[name]["num_examples"]
        assert results[name]["accuracy"] == expected[name]["accuracy"]
        assert results[name]["loss"] == pytest.approx(expected[name]["loss"], abs=1e-5)
    assert (single.num_examples, single.accuracy) == (5, expected["noisy"]["accuracy"])
    assert single.loss == pytest.approx(expected["noisy"]["loss"], abs=1e-5)


class _CountingOpen:
    """``safe_open`` that counts every tensor read by name."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    def __call__(self, *args: object, **kwargs: object) -> "_CountingOpen._Handle":
        return self._Handle(safe_open(*args, **kwargs), self.reads)

    class _Handle:
        def __init__(self, handle: object, reads: Counter) -> None:
            self.handle, self.reads = handle, reads

        def __enter__(self) -> "_CountingOpen._Handle":
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.handle.keys()

        def get_tensor(self, key: str) -> torch.Tensor:
            self.reads[key] += 1
            return self.handle.get_tensor(key)


def test_each_block_is_read_once_per_evaluation_not_once_per_batch(tiny_vit_cache: Path, reference: tuple,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: count every tensor read from the cache, by the shared-parts assembly and by the block reads
    _, state = reference
    model = StreamedGlobalModel(tiny_vit_cache, NUM_CLASSES, LORA, seed=SEED, batch_size=2)
    counting = _CountingOpen()
    monkeypatch.setattr(backbone, "safe_open", counting)
    monkeypatch.setattr(streaming, "safe_open", counting)
    sets = {d: TensorDataset(torch.randn(7, 3, 16, 16), torch.zeros(7, dtype=torch.long)) for d in ("a", "b")}

    # Execute: 14 images in 7 batches of 2
    model.evaluate(state, sets)

    # Assert: every tensor of the cache read exactly once
    with safe_open(str(tiny_vit_cache / WEIGHTS_FILE), framework="pt") as f:
        cache_keys = set(f.keys())
    assert set(counting.reads) == cache_keys
    assert set(counting.reads.values()) == {1}
    assert {k.split(".")[1] for k in cache_keys if k.startswith("blocks.")} == {str(i) for i in range(6)}


def test_a_block_is_freed_before_the_next_is_read(tiny_vit_cache: Path, reference: tuple,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: keep a weak reference to a weight of every block built, and look at them when the next is read
    _, state = reference
    alive_at_read: list[int] = []
    weights: list[weakref.ref] = []
    build_shell, build_block = StreamedGlobalModel._shell, StreamedGlobalModel._block

    def shell(self: StreamedGlobalModel, state: dict) -> torch.nn.Module:
        model = build_shell(self, state)
        weights.append(weakref.ref(next(model.blocks[0].parameters())))
        return model

    def block(self: StreamedGlobalModel, index: int, state: dict) -> torch.nn.Module:
        alive_at_read.append(sum(ref() is not None for ref in weights))
        host = build_block(self, index, state)
        weights.append(weakref.ref(next(host.parameters())))
        return host

    monkeypatch.setattr(StreamedGlobalModel, "_shell", shell)
    monkeypatch.setattr(StreamedGlobalModel, "_block", block)

    # Execute
    stream_logits(tiny_vit_cache, state, torch.randn(5, 3, 16, 16), LORA, NUM_CLASSES, batch_size=2, seed=SEED)

    # Assert: when block i is read, no earlier block's weights are alive (so at most one block at a time)
    assert alive_at_read == [0] * 5
    assert len(weights) == 6 and all(ref() is None for ref in weights)


def test_without_exits_drops_only_depthfl_exit_classifiers() -> None:
    state = {"blocks.2.exit.weight": torch.zeros(1), "blocks.2.attn.proj.lora_A.weight": torch.zeros(1),
             "head.weight": torch.zeros(1)}

    assert set(without_exits(state)) == {"blocks.2.attn.proj.lora_A.weight", "head.weight"}
