"""Use a finished run: the top classes of images under its final adapters, on a node of any size.

``python -m fedra_core.predict RUN_DIR IMAGE_OR_FOLDER... [--max-layers k | --memory-budget-mb M]``
runs the run's full-depth global model (its ``adapters.safetensors`` on the node's own
backbone cache) on the images and prints the top-k class names of each (``--json`` for
JSON). A node that holds fewer blocks than the model has runs it block by block from
its cache (``fedra_core.streaming``); otherwise the model is held in memory. The cache
must hold the weights the run was tuned on, as ``resume`` checks. Errors are one line
on stderr and exit code 2.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedra_core.backbone import BackboneCacheError, CacheMeta, read_meta
from fedra_core.capacity import backbone_sizes, layers_for_budget
from fedra_core.config import ConfigError, Experiment, is_device_name
from fedra_core.data import BUILTIN_MEAN, BUILTIN_STD, DIGIT_CLASSES, ImageFileDataset
from fedra_core.data.folders import IMAGE_EXTENSIONS
from fedra_core.datasets import domain_names, load_domains
from fedra_core.evaluation import GlobalModel
from fedra_core.lora import State, StateMismatchError
from fedra_core.methods import Method, method_for
from fedra_core.records import ADAPTERS, RunOutput
from fedra_core.run import check_same_backbone
from fedra_core.streaming import stream_logits, without_exits


class PredictError(RuntimeError):
    """The run, the cache or the images cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first: (class name, label, probability)."""

    image: str
    top: tuple[tuple[str, int, float], ...]


@dataclass(frozen=True)
class PredictResult:
    """Predictions and how the model was run."""

    mode: str  # "in-memory" or "streamed"
    model_blocks: int  # blocks of the run's global model
    node_blocks: int | None  # blocks the node can hold (None: not limited)
    predictions: tuple[Prediction, ...]


@dataclass(frozen=True)
class _Run:
    """What a finished run folder provides."""

    experiment: Experiment
    output: RunOutput
    state: State


def read_run(run_dir: Path) -> _Run:
    """The experiment and final adapters of a finished run, with a clear error for anything missing."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PredictError(f"{run_dir} is not a run folder (no config.yaml)")
    adapters = run_dir / ADAPTERS
    if not adapters.is_file():
        raise PredictError(f"{adapters} is missing: {run_dir} is not a finished run")
    output = RunOutput(run_dir)
    try:
        state = load_file(str(adapters))
    except (SafetensorError, OSError) as err:
        raise PredictError(f"{adapters} is unreadable: {err}") from None
    return _Run(output.read_config(), output, state)


def class_names(experiment: Experiment, meta: CacheMeta, data_root: str | None = None) -> tuple[str, ...] | None:
    """The run's label names, from its data config; None when its data is not on this node.

    The built-in benchmark's are the digits; a folder dataset's are its class folder
    names (sorted union over the domains); DomainNet's and NICO++'s the folders named
    in their split files.
    """
    cfg = experiment.data
    if cfg.dataset == "builtin-digits":
        return DIGIT_CLASSES
    root = data_root or cfg.root
    try:
        names = domain_names(cfg, root)
        domains = load_domains(cfg, root, meta.image_size, tuple(meta.mean), tuple(meta.std),
                               experiment.seed, tuple(names))
    except (OSError, ValueError):
        return None
    return tuple(domains[0].classes)


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The listed image files, a folder standing for the image files directly inside it (sorted)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise PredictError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise PredictError(f"image not found: {path}")
    return files


def load_images(files: Sequence[Path], experiment: Experiment, meta: CacheMeta) -> torch.Tensor:
    """Images ``(N, 3, S, S)`` decoded and normalized as the run's test images were."""
    builtin = experiment.data.dataset == "builtin-digits"  # normalized by the benchmark's own mean and std
    mean, std = (BUILTIN_MEAN, BUILTIN_STD) if builtin else (meta.mean, meta.std)
    dataset = ImageFileDataset(files, [0] * len(files), meta.image_size, mean, std, train=False)
    try:
        return torch.stack([dataset[i][0] for i in range(len(dataset))])  # (N, 3, S, S)
    except (ValueError, OSError) as err:
        raise PredictError(str(err)) from None


def node_blocks(cache: Path, max_layers: int | None, memory_budget_mb: float | None) -> int | None:
    """Blocks this node can hold: ``--max-layers``, or what ``--memory-budget-mb`` holds, or None."""
    if memory_budget_mb is not None:
        try:
            return layers_for_budget(memory_budget_mb, backbone_sizes(cache))
        except ValueError as err:
            raise PredictError(str(err)) from None
    if max_layers is not None and max_layers < 1:
        raise PredictError(f"--max-layers must be at least 1, got {max_layers}")
    return max_layers


def predict(run_dir: Path, images: Sequence[Path], max_layers: int | None = None,
            memory_budget_mb: float | None = None, backbone_cache: Path | None = None, top_k: int = 5,
            data_root: str | None = None, device: str = "cpu", batch_size: int = 32,
            architecture: str | None = None) -> PredictResult:
    """Top-k classes of each image under a finished run's final adapters.

    Parameters
    ----------
    run_dir : Path
        A finished run folder (``config.yaml``, ``adapters.safetensors``).
    images : Sequence[Path]
        Image files, or folders of image files.
    max_layers, memory_budget_mb : int or float, optional
        What the node can hold; the model is streamed block by block when it has
        more blocks than that, held in memory otherwise (and when neither is given).
    backbone_cache : Path, optional
        The node's backbone cache; default the run's ``backbone.cache``.
    top_k : int
        Classes given per image.
    data_root : str, optional
        Where the run's dataset lies on this node (for its class names); default the
        run's ``data.root``. Without it, classes are named ``class_<label>``.
    device : str
        Where the model computes.
    batch_size : int
        Images run at once.
    architecture : str, optional
        For a HeteroTune run (several backbones): the architecture this node runs;
        its cache defaults to the run's cache of that architecture.

    Returns
    -------
    PredictResult
        The predictions in image order, and how the model was run.
    """
    if not is_device_name(device) or (device != "cpu" and not torch.cuda.is_available()):
        raise PredictError(f"--device {device!r} is not available here (cpu, or cuda / cuda:N with CUDA)")
    run = read_run(run_dir)
    experiment = run.experiment
    if method_for(experiment).heterogeneous:
        return _predict_architecture(run, experiment, images, architecture, max_layers, memory_budget_mb,
                                     backbone_cache, top_k, data_root, device, batch_size)
    if architecture is not None:
        raise PredictError(f"--architecture: {run_dir} tuned one backbone, not several architectures")
    cache = Path(backbone_cache) if backbone_cache else experiment.backbone.cache_path
    meta = read_meta(cache)
    check_same_backbone(run.output, meta)
    files = image_files(images)
    pixels = load_images(files, experiment, meta)
    names = class_names(experiment, meta, data_root)
    state = without_exits(run.state)  # DepthFL: its head, the deepest classifier, answers
    num_classes = _num_classes(state, names)
    names = names or tuple(f"class_{i}" for i in range(num_classes))
    layers = method_for(experiment).global_layers(meta.num_layers)
    depth = len(layers) if layers else meta.num_layers
    holds = node_blocks(cache, max_layers, memory_budget_mb)
    streamed = holds is not None and holds < depth
    lora, seed = experiment.backbone.lora, experiment.seed
    if streamed:
        logits = stream_logits(cache, state, pixels, lora, num_classes, device, batch_size, seed, layers)
    else:
        logits = _in_memory_logits(cache, state, pixels, experiment, num_classes, layers, device, batch_size)
    top = torch.softmax(logits, dim=1).topk(min(top_k, num_classes), dim=1)
    predictions = tuple(
        Prediction(str(path), tuple((names[i], i, float(p)) for p, i in zip(probs.tolist(), labels.tolist())))
        for path, probs, labels in zip(files, top.values, top.indices))
    return PredictResult("streamed" if streamed else "in-memory", depth, holds, predictions)


def _predict_architecture(run: _Run, experiment: Experiment, images: Sequence[Path], architecture: str | None,
                          max_layers: int | None, memory_budget_mb: float | None, backbone_cache: Path | None,
                          top_k: int, data_root: str | None, device: str, batch_size: int) -> PredictResult:
    """A HeteroTune run: the global model of one architecture, held in memory."""
    method = method_for(experiment)
    names_known = method.architectures()
    if architecture not in names_known:
        raise PredictError(f"--architecture: this run tuned the architectures {', '.join(names_known)}; "
                           f"name the one this node runs (got {architecture!r})")
    cache = Path(backbone_cache) if backbone_cache else experiment.backbone.architecture(architecture).cache_path
    meta = read_meta(cache)
    check_same_backbone(run.output, {architecture: meta})
    holds = node_blocks(cache, max_layers, memory_budget_mb)
    if holds is not None and holds < meta.num_layers:
        raise PredictError(f"this node holds {holds} of the {meta.num_layers} blocks of architecture "
                           f"{architecture!r}; a HeteroTune model runs in memory (streaming covers one backbone)")
    files = image_files(images)
    pixels = load_images(files, experiment, meta)
    names = class_names(experiment, meta, data_root)
    state = method.sendable(run.state, range(meta.num_layers), architecture, meta.num_layers)
    head = state.get(f"{architecture}/head.private.weight")
    num_classes = int(head.shape[0]) if head is not None else len(names or ())
    names = names or tuple(f"class_{i}" for i in range(num_classes))
    model = GlobalModel(cache, num_classes, method, device=device, architecture=architecture)
    model.load(state)
    with torch.no_grad():
        net = model.model.eval()
        logits = torch.cat([net(pixels[i:i + batch_size].to(device)).float().cpu()
                            for i in range(0, len(pixels), batch_size)])
    top = torch.softmax(logits, dim=1).topk(min(top_k, num_classes), dim=1)
    predictions = tuple(
        Prediction(str(path), tuple((names[i], i, float(p)) for p, i in zip(probs.tolist(), labels.tolist())))
        for path, probs, labels in zip(files, top.values, top.indices))
    return PredictResult("in-memory", meta.num_layers, holds, predictions)


def _num_classes(state: State, names: tuple[str, ...] | None) -> int:
    """Size of the head: from the trained head in the adapters, else from the class names."""
    if "head.weight" in state:
        count = int(state["head.weight"].shape[0])
        if names is not None and len(names) != count:
            raise PredictError(f"the run's head has {count} classes but its data names {len(names)}")
        return count
    if names is None:
        raise PredictError("the run's head is not in its adapters (train_head: false) and its data is not on "
                           "this node to count the classes: pass --data-root")
    return len(names)


@torch.no_grad()
def _in_memory_logits(cache: Path, state: State, pixels: torch.Tensor, experiment: Experiment, num_classes: int,
                      layers: list[int] | None, device: str, batch_size: int) -> torch.Tensor:
    """Logits ``(N, num_classes)`` of the whole global model held in memory."""
    # The plain LoRA model (the base method): DepthFL's exits are not needed for its head's answer.
    global_model = GlobalModel(cache, num_classes, Method(experiment), device=device, layers=layers)
    global_model.load(state)
    model = global_model.model.eval()
    return torch.cat([model(pixels[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(pixels), batch_size)])


def format_text(result: PredictResult) -> str:
    """One line per image: ``path: name (p%), ...``, after a line saying how the model ran."""
    held = "" if result.node_blocks is None else f"; the node holds {result.node_blocks}"
    how = "streamed block by block" if result.mode == "streamed" else "in memory"
    lines = [f"# {result.model_blocks}-block global model, {how}{held}"]
    for item in result.predictions:
        lines.append(f"{item.image}: " + ", ".join(f"{name} ({100 * p:.1f}%)" for name, _, p in item.top))
    return "\n".join(lines)


def format_json(result: PredictResult) -> str:
    """The result as one JSON object."""
    return json.dumps({
        "mode": result.mode, "model_blocks": result.model_blocks, "node_blocks": result.node_blocks,
        "predictions": [{"image": item.image,
                         "top_k": [{"class": name, "label": label, "probability": p} for name, label, p in item.top]}
                        for item in result.predictions]}, indent=2)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: predict, print text or JSON; one-line errors with exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m fedra_core.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (holds adapters.safetensors)")
    parser.add_argument("images", type=Path, nargs="+", help="image files, or folders of image files")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--max-layers", type=int, help="blocks this node can hold (fewer than the model: streamed)")
    fit.add_argument("--memory-budget-mb", type=float, help="MiB of backbone weights this node can hold")
    parser.add_argument("--backbone-cache", type=Path, help="this node's backbone cache (default: the run's)")
    parser.add_argument("--data-root", help="the run's dataset on this node, for class names (default: the run's)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="images run at once")
    parser.add_argument("--architecture", help="HeteroTune runs: the architecture this node runs, e.g. s")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    try:
        result = predict(args.run_dir, args.images, args.max_layers, args.memory_budget_mb, args.backbone_cache,
                         args.top_k, args.data_root, args.device, args.batch_size, args.architecture)
    except (PredictError, BackboneCacheError, ConfigError, StateMismatchError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_json(result) if args.json else format_text(result))


if __name__ == "__main__":
    main()
