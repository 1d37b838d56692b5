"""The global model: the method's evaluated model, its initial state and per-domain accuracy."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from fedra_core.backbone import read_meta
from fedra_core.config import BackboneConfig, Experiment, LoraSettings
from fedra_core.lora import State
from fedra_core.methods import Method
from fedra_core.training import evaluate


class GlobalModel:
    """The method's global model on a backbone cache: its blocks with the global adapters plugged in.

    Parameters
    ----------
    cache_dir : Path
        The backbone cache (for HeteroTune, the cache of ``architecture``).
    num_classes : int
        Size of the label space.
    method : Method
        Builds the adapters (``build``), names and loads the state, says which blocks
        the evaluated model has (``global_layers``) and how it is scored.
    device : str
        Where the model runs.
    layers : Sequence[int], optional
        Blocks to assemble instead of the method's (the probe's sub-models).
    architecture : str, optional
        The backbone architecture the cache holds (heterogeneous methods).
    extras : Mapping[str, Tensor], optional
        What the method's server sends beside the state (a run's own block surrogates).
    """

    def __init__(self, cache_dir: Path, num_classes: int, method: Method, device: str = "cpu",
                 layers: Sequence[int] | None = None, architecture: str | None = None,
                 extras: Mapping[str, torch.Tensor] | None = None) -> None:
        self.device = torch.device(device)
        self.method, self.architecture = method, architecture
        self.classifiers = method.classifiers()  # a method with several classifiers is also scored by their ensemble
        num_layers = read_meta(cache_dir).num_layers
        if layers is None:
            layers = method.global_layers(num_layers)  # all-small's shallow model; None: all blocks
        seed = method.experiment.seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapters and the head start from the run's seed
            model, _ = method.assemble(cache_dir, layers, num_classes, "cpu", extras)  # FedRA's surrogates
            model = method.build(model, num_classes, num_layers, architecture)
            self.model = model.to(self.device)
        self._initial = method.trainable_state(self.model, architecture)

    @classmethod
    def with_lora(cls, cache_dir: Path, num_classes: int, lora: LoraSettings, device: str = "cpu", seed: int = 0,
                  layers: Sequence[int] | None = None) -> "GlobalModel":
        """FedRA's global model (LoRA and the head) with these LoRA settings and seed, outside any experiment."""
        experiment = Experiment(seed=seed, backbone=BackboneConfig(lora=lora))
        return cls(cache_dir, num_classes, Method(experiment), device=device, layers=layers)

    def initial_state(self) -> State:
        """The trainable state before any round: LoRA A random, LoRA B zero, fresh head."""
        return {k: v.clone() for k, v in self._initial.items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Plug a global state (exactly this model's trainable tensors) into the model."""
        self.method.load_state(self.model, {k: v.to(self.device) for k, v in state.items()}, self.architecture)

    def evaluate(self, state: Mapping[str, torch.Tensor], test_sets: Mapping[str, Dataset],
                 batch_size: int = 256, precision: str = "fp32") -> dict[str, dict[str, float]]:
        """Loss, accuracy and size of every domain's test set under ``state``.

        With ``classifiers``, also ``ensemble_accuracy``: that of the mean logits of
        all the model's classifiers (``accuracy`` stays the deepest one's).
        """
        self.load(state)
        results = {}
        for name, dataset in test_sets.items():
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=self.device.type == "cuda")
            result = evaluate(self.model, loader, self.device, precision, self.classifiers)
            results[name] = {"loss": result.loss, "accuracy": result.accuracy, "num_examples": result.num_examples}
            if result.ensemble_accuracy is not None:
                results[name]["ensemble_accuracy"] = result.ensemble_accuracy
        return results
