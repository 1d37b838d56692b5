"""The full-depth global model on the server: initial state and per-domain accuracy."""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedra_core.backbone import assemble
from fedra_core.config import LoraSettings
from fedra_core.lora import State, attach_lora, load_trainable_state, trainable_state
from fedra_core.training import ClassifiersFn, evaluate


class GlobalModel:
    """All blocks of the backbone (or the listed ones) with the global adapters plugged in."""

    def __init__(self, cache_dir: Path, num_classes: int, lora: LoraSettings,
                 device: str = "cpu", seed: int = 0, layers: Sequence[int] | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None,
                 classifiers: ClassifiersFn | None = None) -> None:
        self.device = torch.device(device)
        self.classifiers = classifiers  # a method with several classifiers is also scored by their ensemble
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA A and the head start from the run's seed
            model, _ = assemble(cache_dir, layers, num_classes, "cpu")  # layers: all-small's shallow model
            model = attach_lora(model, lora, head_seed=seed)  # a frozen head: the clients' draw
            model = prepare(model) if prepare else model  # a baseline's extra state (DepthFL's exits)
            self.model = model.to(self.device)
        self._initial = trainable_state(self.model)

    def initial_state(self) -> State:
        """The trainable state before any round: LoRA A random, LoRA B zero, fresh head."""
        return {k: v.clone() for k, v in self._initial.items()}

    def evaluate(self, state: Mapping[str, torch.Tensor], test_sets: Mapping[str, Dataset],
                 batch_size: int = 256, precision: str = "fp32") -> dict[str, dict[str, float]]:
        """Loss, accuracy and size of every domain's test set under ``state``.

        With ``classifiers``, also ``ensemble_accuracy``: that of the mean logits of
        all the model's classifiers (``accuracy`` stays the deepest one's).
        """
        load_trainable_state(self.model, {k: v.to(self.device) for k, v in state.items()})
        results = {}
        for name, dataset in test_sets.items():
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
            result = evaluate(self.model, loader, self.device, precision, self.classifiers)
            results[name] = {"loss": result.loss, "accuracy": result.accuracy, "num_examples": result.num_examples}
            if result.ensemble_accuracy is not None:
                results[name]["ensemble_accuracy"] = result.ensemble_accuracy
        return results
