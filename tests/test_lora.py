"""LoRA on sub-models: global names, strict loading, gradient flow, additivity."""

from pathlib import Path

import pytest
import torch

from fedra_core.backbone import assemble
from fedra_core.config import LoraSettings, NodeSettings
from fedra_core.lora import StateMismatchError, attach_lora, load_trainable_state, slice_state, trainable_state

LORA = LoraSettings(rank=4, alpha=4, dropout=0.0)


def _adapted(cache: Path, layers: list[int] | None, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model, _ = assemble(cache, layers, num_classes=5)
        return attach_lora(model, LORA, head_seed=seed)


def test_trainable_state_uses_global_names(tiny_vit_cache: Path) -> None:
    state = trainable_state(_adapted(tiny_vit_cache, [1, 4]))
    assert "blocks.4.attn.proj.lora_A.weight" in state and "blocks.1.mlp.fc2.lora_B.weight" in state
    assert {"head.weight", "head.bias"} <= set(state)
    assert not any(".default" in k for k in state)
    assert {k.split(".")[1] for k in state if k.startswith("blocks.")} == {"1", "4"}
    assert not any("patch_embed" in k or "qkv" in k or "fc1" in k for k in state)


def test_only_adapters_and_head_get_gradients(tiny_vit_cache: Path) -> None:
    model = _adapted(tiny_vit_cache, [0, 3])
    with torch.no_grad():  # B starts at zero; make it non-zero so A gets a gradient too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    for name, param in model.named_parameters():
        trains = "lora_" in name or name.startswith("head.")
        assert param.requires_grad == trains, name
        if trains:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_load_is_strict(tiny_vit_cache: Path) -> None:
    model = _adapted(tiny_vit_cache, [1, 2])
    state = trainable_state(model)
    load_trainable_state(model, state)
    with pytest.raises(StateMismatchError, match="missing"):
        load_trainable_state(model, {k: v for k, v in state.items() if "lora_B" not in k})
    with pytest.raises(StateMismatchError, match="unexpected"):
        load_trainable_state(model, {**state, "blocks.5.attn.proj.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(StateMismatchError, match="shape"):
        load_trainable_state(model, {**state, "head.weight": torch.zeros(3, 32)})


def test_loading_places_every_tensor(tiny_vit_cache: Path) -> None:
    model = _adapted(tiny_vit_cache, [2])
    target = {k: torch.randn_like(v) for k, v in trainable_state(model).items()}
    load_trainable_state(model, target)
    for key, value in trainable_state(model).items():
        assert torch.equal(value, target[key]), key


def test_shallow_adapter_changes_exactly_its_block_in_the_full_model(tiny_vit_cache: Path) -> None:
    # Train block 4's adapter inside a 2-block sub-model {1, 4}.
    sub = _adapted(tiny_vit_cache, [1, 4], seed=1)
    optimizer = torch.optim.SGD([p for p in sub.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(sub(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = trainable_state(sub)
    assert trained["blocks.4.attn.proj.lora_B.weight"].abs().sum() > 0

    # Plug the block-4 adapter into the full-depth model at its global index.
    full = _adapted(tiny_vit_cache, None, seed=2)
    before = trainable_state(full)
    update = {k: (trained[k] if k.startswith("blocks.4.") else v) for k, v in before.items()}
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        outputs_before = [blk(tokens) for blk in full.blocks]
        load_trainable_state(full, update)
        outputs_after = [blk(tokens) for blk in full.blocks]
    changed = [i for i, (a, b) in enumerate(zip(outputs_before, outputs_after)) if not torch.allclose(a, b)]
    assert changed == [4]


def test_slice_state_keeps_held_blocks_and_shared_keys() -> None:
    state = {"blocks.0.x": torch.zeros(1), "blocks.3.x": torch.zeros(1), "blocks.10.x": torch.zeros(1),
             "head.weight": torch.zeros(1)}
    assert sorted(slice_state(state, [3, 10])) == ["blocks.10.x", "blocks.3.x", "head.weight"]


def test_reference_targets_also_adapt_the_patch_embedding_as_a_shared_tensor(tiny_vit_cache: Path) -> None:
    from fedra_core.aggregation import masked_average
    from fedra_core.config import experiment_from_dict
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import run_local_round

    experiment = experiment_from_dict({
        "backbone": {"cache": str(tiny_vit_cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0,
                                                            "target_modules": ["proj", "mlp.fc2"]}},
        "clients": {"capacities": [6, 2]}, "training": {"local_steps": 2, "batch_size": 8, "lr": 0.05}})
    server = GlobalModel.with_lora(tiny_vit_cache, 5, experiment.backbone.lora)
    state = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v) for k, v in server.initial_state().items()}
    shared = {"patch_embed.proj.lora_A.weight", "patch_embed.proj.lora_B.weight"}
    assert shared <= set(state) and "blocks.3.attn.proj.lora_A.weight" in state  # suffix "proj": both
    assert not any("qkv" in k for k in state)
    assert state["patch_embed.proj.lora_A.weight"].shape == (2, 3, 4, 4)  # a conv adapter on the conv

    node = NodeSettings(0, 2, 2, None, tiny_vit_cache, "cpu")
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 16, 16), torch.arange(16) % 5)
    deltas = [run_local_round(experiment, node, layers, slice_state(state, layers), data, 5, server_round=1).delta
              for layers in ([0, 4], [2, 5])]
    assert all(shared <= set(d) and d["patch_embed.proj.lora_A.weight"].abs().sum() > 0 for d in deltas)

    new = masked_average(state, deltas)  # shared: averaged over both clients; a block: over its holder
    for key in shared:
        torch.testing.assert_close(new[key], state[key] + (deltas[0][key] + deltas[1][key]) / 2)
    torch.testing.assert_close(new["blocks.4.mlp.fc2.lora_B.weight"],
                               state["blocks.4.mlp.fc2.lora_B.weight"] + deltas[0]["blocks.4.mlp.fc2.lora_B.weight"])
    load_trainable_state(server.model, new)  # the full model takes the averaged shared adapter


def test_adapters_under_autocast_do_not_copy_activations_to_float32(tiny_vit_cache: Path) -> None:
    """Under bf16 autocast an adapter sees the block's bf16 activation, not a float32 copy of it."""
    model, _ = assemble(tiny_vit_cache, [0, 1], num_classes=3)
    model = attach_lora(model, LoraSettings(rank=2, alpha=2, dropout=0.1), head_seed=0)
    seen = []
    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            module.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 16, 16))
    logits.float().sum().backward()

    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for n, p in model.named_parameters() if "lora_A" in n)
