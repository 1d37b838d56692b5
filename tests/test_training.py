"""The shared training loop and a client's local round on a tiny real ViT."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedra_core.config import LoraSettings, TrainingConfig, experiment_from_dict, resolve_node
from fedra_core.evaluation import GlobalModel
from fedra_core.local import build_submodel, resolve_device, run_local_round
from fedra_core.training import train_local
from fedra_core.lora import slice_state


def _toy_data(n: int = 64, classes: int = 4) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, 16, 16, generator=gen) * 0.1 + labels.view(n, 1, 1, 1) * 0.5
    return TensorDataset(images, labels)


def _experiment(cache: Path, **training: object) -> object:
    return experiment_from_dict({
        "backbone": {"cache": str(cache), "lora": {"rank": 4, "alpha": 4, "dropout": 0.0}},
        "clients": {"capacities": [6, 2]},
        "training": {"local_steps": 6, "batch_size": 16, "optimizer": "adamw", "lr": 0.01, **training},
    })


def test_local_round_trains_only_what_was_sent_and_is_reproducible(tiny_vit_cache: Path) -> None:
    experiment = _experiment(tiny_vit_cache)
    node = resolve_node(experiment, {"partition-id": 1})
    global_state = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora).initial_state()
    received = slice_state(global_state, [1, 4])

    first = run_local_round(experiment, node, [1, 4], received, _toy_data(), 4, server_round=3)
    again = run_local_round(experiment, node, [1, 4], received, _toy_data(), 4, server_round=3)

    assert set(first.delta) == set(received)
    assert first.delta["blocks.4.mlp.fc2.lora_B.weight"].abs().sum() > 0
    assert first.result.steps == 6 and first.result.num_examples == 96
    assert all(torch.equal(first.delta[k], again.delta[k]) for k in first.delta)
    assert first.assembly.tensors_read < 40


def test_loader_workers_train_on_the_same_batches(tiny_vit_cache: Path) -> None:
    """Batches loaded by worker processes come in the training process's order: the same round."""
    node = resolve_node(_experiment(tiny_vit_cache), {"partition-id": 1})
    received = slice_state(GlobalModel.with_lora(tiny_vit_cache, 4, _experiment(tiny_vit_cache).backbone.lora)
                           .initial_state(), [1, 4])

    inline = run_local_round(_experiment(tiny_vit_cache), node, [1, 4], received, _toy_data(), 4, server_round=2)
    workers = run_local_round(_experiment(tiny_vit_cache, loader_workers=2), node, [1, 4], received, _toy_data(), 4,
                              server_round=2)

    assert workers.result.num_examples == inline.result.num_examples == 96
    assert all(torch.equal(inline.delta[k], workers.delta[k]) for k in inline.delta)


def test_device_gathered_batches_are_the_loaders_batches() -> None:
    """On CUDA an in-memory data set is gathered on the device: same batches, same order as the DataLoader."""
    from torch.utils.data import DataLoader, Subset

    from fedra_core.data.builtin import ImageTensorDataset
    from fedra_core.local import DeviceTensorBatches, tensors_in_memory

    full = ImageTensorDataset(torch.randn(50, 3, 4, 4), torch.arange(50) % 7)
    subset = Subset(full, [3, 9, 4, 40, 22, 17, 8, 30, 31, 2, 11, 45, 6])

    def batches(make) -> list:
        generator = torch.Generator().manual_seed(11)
        source = make(generator)
        return [b for _ in range(3) for b in source]  # three epochs: the generator moves on

    loader = batches(lambda g: DataLoader(subset, batch_size=4, shuffle=True, generator=g, drop_last=True))
    gathered = batches(lambda g: DeviceTensorBatches(
        tensors_in_memory(subset), DataLoader(range(len(subset)), batch_size=4, shuffle=True, generator=g,
                                              drop_last=True), torch.device("cpu")))

    assert len(loader) == len(gathered) == 9
    for (images, labels), (d_images, d_labels) in zip(loader, gathered):
        assert torch.equal(images, d_images) and torch.equal(labels, d_labels)

    class Augmented(TensorDataset):  # items are not rows of the tensors: left to the DataLoader
        def __getitem__(self, index: int) -> tuple:
            return self.tensors[0][index].flip(-1), self.tensors[1][index]

    assert tensors_in_memory(Augmented(torch.randn(4, 3, 4, 4), torch.arange(4))) is None
    assert tensors_in_memory(TensorDataset(torch.randn(4, 3, 4, 4), torch.arange(4))) is not None


@pytest.mark.parametrize("workers", [-1, 1.5, True, "4"])
def test_training_config_rejects_bad_loader_workers(workers: object) -> None:
    with pytest.raises(ValueError, match="training.loader_workers"):
        TrainingConfig(loader_workers=workers)


def test_too_many_blocks_for_the_node_is_refused(tiny_vit_cache: Path) -> None:
    experiment = _experiment(tiny_vit_cache)
    node = resolve_node(experiment, {"partition-id": 1})  # holds 2
    state = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora).initial_state()
    with pytest.raises(ValueError, match="at most 2"):
        run_local_round(experiment, node, [0, 1, 2], slice_state(state, [0, 1, 2]), _toy_data(), 4, 1)


def test_bf16_autocast_runs_on_cpu(tiny_vit_cache: Path) -> None:
    experiment = _experiment(tiny_vit_cache, precision="bf16")
    node = resolve_node(experiment, {"partition-id": 0})
    state = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora).initial_state()
    out = run_local_round(experiment, node, [0, 5], slice_state(state, [0, 5]), _toy_data(), 4, 1)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.delta.values())


def test_training_lowers_the_loss(tiny_vit_cache: Path) -> None:
    experiment = _experiment(tiny_vit_cache, local_steps=30)
    node = resolve_node(experiment, {"partition-id": 0})
    model = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora)
    state = model.initial_state()
    before = model.evaluate(state, {"toy": _toy_data()})["toy"]["loss"]
    out = run_local_round(experiment, node, list(range(6)), state, _toy_data(), 4, 1)
    after = model.evaluate({k: state[k] + out.delta[k] for k in state}, {"toy": _toy_data()})["toy"]["loss"]
    assert after < before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_training_config_rejects_bad_device() -> None:
    with pytest.raises(ValueError, match="training.device"):
        TrainingConfig(device="gpu0")
    assert LoraSettings().target_modules == ("attn.proj", "mlp.fc2")


def test_a_frozen_head_is_the_same_on_the_server_and_every_client(tiny_vit_cache: Path) -> None:
    values = {"backbone": {"cache": str(tiny_vit_cache),
                           "lora": {"rank": 4, "alpha": 4, "dropout": 0.0, "train_head": False}},
              "clients": {"capacities": [6, 2]}, "seed": 7,
              "training": {"local_steps": 3, "batch_size": 16, "optimizer": "adamw", "lr": 0.01}}
    experiment = experiment_from_dict(values)
    server = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora, seed=7)
    state = server.initial_state()
    node = resolve_node(experiment, {"partition-id": 1})
    torch.manual_seed(123)  # a client's own random state must not matter

    client, _ = build_submodel(experiment, node, [2, 5], 4, slice_state(state, [2, 5]))
    local = run_local_round(experiment, node, [2, 5], slice_state(state, [2, 5]), _toy_data(), 4, server_round=1)

    assert not any(k.startswith("head.") for k in state)  # frozen: never sent
    assert not any(p.requires_grad for p in client.get_classifier().parameters())
    for name, value in server.model.get_classifier().state_dict().items():
        torch.testing.assert_close(client.get_classifier().state_dict()[name], value)
    other = GlobalModel.with_lora(tiny_vit_cache, 4, experiment.backbone.lora, seed=8).model.get_classifier()
    assert not torch.equal(other.weight, server.model.get_classifier().weight)  # drawn from the run's seed
    assert local.delta["blocks.5.mlp.fc2.lora_B.weight"].abs().sum() > 0  # adapters train against it


def test_fp16_trains_with_a_gradient_scaler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    data = TensorDataset(torch.randn(32, 8), torch.arange(32) % 4)
    cfg = TrainingConfig(precision="fp16", optimizer="sgd", lr=1e4, momentum=0.0, weight_decay=0.0,
                         local_steps=1, batch_size=32, grad_clip=10.0)

    def tiny_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):  # noqa: ANN202
        logits = net(images)  # fp16 under autocast
        return logits, torch.nn.functional.cross_entropy(logits, labels) * 1e-7  # fp16 gradients ~1e-9

    train_local(model, torch.utils.data.DataLoader(data, batch_size=32), cfg, torch.device("cpu"), tiny_loss)

    # unscaled, every fp16 gradient underflows to zero and SGD leaves the weights as they were
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
