"""Probe a finished run: its global adapters evaluated through shallow sub-models.

``python -m fedra_core.probe RUN_DIR [--depths 3 6 9] [--draws 3] [--out FILE]``
evaluates the run's final ``adapters.safetensors`` on every domain's test set through
the full model, through the first k blocks (what a depth-first client trains) and
through random k-block sub-models (what a FedRA client trains), and prints a Markdown
table. It shows, for instance, whether a backbone still works with blocks skipped, and
how far a weak client's domain is learned at the depth that client trains.
With ``--surrogates``, every shallow sub-model is also evaluated with block surrogates in
its skipped positions (``fedra_core.surrogates``), for runs of methods whose adapters are
plain LoRA: the run's own final ones when it kept them (``redistill``, ``tuned``: from its
checkpoint), else the cache's (distilled first when the cache has none).
With ``--calibrate``, the method's global model is also evaluated with its head calibrated
as the server's ``strategy.head_calibration: lda`` would set it after the run's last round
(``fedra_core.calibration``), from every client's training images, read here: what
calibrating that run would have given. The experiment's data must be on this machine.
"""

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedra_core.config import Experiment
from fedra_core.datasets import test_sets
from fedra_core.evaluation import GlobalModel
from fedra_core.lora import slice_state
from fedra_core.methods import Method, method_class, method_for
from fedra_core.records import ADAPTERS, RunOutput
from fedra_core.run import check_same_backbone, prepare_backbone
from fedra_core.surrogates import ensure_surrogates, recipe_of


@dataclass(frozen=True)
class ProbeRow:
    """Accuracy (%) per domain of one sub-model."""

    label: str
    layers: tuple[int, ...]
    accuracy: dict[str, float]

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracy.values())))


def sub_models(num_layers: int, depths: Sequence[int], draws: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """The probed block lists: all, then for each depth the first k and ``draws`` random k."""
    rng = np.random.default_rng(seed)
    plan = [("all blocks", list(range(num_layers)))]
    for k in depths:
        if not 1 <= k <= num_layers:
            raise ValueError(f"--depths: {k} is outside 1..{num_layers}")
        if k == num_layers:
            continue
        plan.append((f"first {k}", list(range(k))))
        plan += [(f"random {k}", sorted(rng.choice(num_layers, size=k, replace=False).tolist()))
                 for _ in range(draws)]
    return plan


def probe_methods(experiment: Experiment, surrogates: bool = False) -> list[tuple[str, Method]]:
    """The probed methods with their row-label suffix: plain sub-models, and with surrogates if asked.

    The plain one has no surrogates even when the run trained with them; the other puts
    surrogates in the skipped positions: the cache's frozen ones, or for a run whose
    server kept its own (``redistill``, ``tuned``) a method of that mode, given them by
    ``run_surrogates``.
    """
    strategy = experiment.strategy
    plain = [("", method_for(replace(experiment, strategy=replace(strategy, surrogates=None))))]
    if not surrogates:
        return plain
    if method_class(strategy.method).build is not Method.build:
        raise ValueError(f"--surrogates: the adapters of method {strategy.method!r} are not plain LoRA")
    mode = strategy.surrogates if strategy.surrogates in ("redistill", "tuned") else "frozen"
    stand_in = replace(experiment, strategy=replace(strategy, method="fedra", surrogates=mode))
    return [*plain, (" + surrogates", method_for(stand_in))]


def run_surrogates(output: RunOutput, experiment: Experiment) -> dict[str, torch.Tensor] | None:
    """The final surrogates a ``redistill`` or ``tuned`` run's server kept (its checkpoint), or None."""
    from fedra_core.records import CheckpointError
    from fedra_core.surrogates import PREFIX

    if experiment.strategy.surrogates not in ("redistill", "tuned"):
        return None
    try:
        server_state = output.load_checkpoint().server_state
    except CheckpointError as err:
        raise ValueError(f"--surrogates: the run's own {experiment.strategy.surrogates} surrogates are in its "
                         f"checkpoint, which cannot be read: {err}") from err
    own = {k[len(PREFIX):]: v for k, v in server_state.items() if k.startswith(PREFIX)}
    return own or None


def calibrated(experiment: Experiment, meta: Any, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the head every client's feature sums give (``strategy.head_calibration: lda``)."""
    from fedra_core.calibration import calibrate_state
    from fedra_core.config import resolve_node
    from fedra_core.datasets import client_data
    from fedra_core.federated import statistics_on_node

    sums = []
    for partition in range(experiment.num_clients):
        node = resolve_node(experiment, {"partition-id": partition, "num-partitions": experiment.num_clients})
        sums.append(statistics_on_node(experiment, node, meta, client_data(experiment, node, meta), state))
    return calibrate_state(state, sums, experiment.strategy.calibration_shrinkage)[0]


def probe(run_dir: Path, depths: Sequence[int] = (3, 6, 9), draws: int = 3, seed: int = 0,
          surrogates: bool = False, calibrate: bool = False) -> list[ProbeRow]:
    """Evaluate a finished run's final global state through full and shallow sub-models (and with surrogates)."""
    run_dir = Path(run_dir)
    adapters = run_dir / ADAPTERS
    if not adapters.is_file():
        raise FileNotFoundError(f"{adapters} is missing: {run_dir} is not a finished run")
    output = RunOutput(run_dir)
    experiment = output.read_config()
    meta = prepare_backbone(experiment)
    check_same_backbone(output, meta)
    sets, num_classes = test_sets(experiment, meta)
    state = load_file(str(adapters))
    methods = probe_methods(experiment, surrogates)
    own = run_surrogates(output, experiment) if surrogates else None
    if surrogates and own is None:
        ensure_surrogates(experiment.backbone.cache_path, recipe_of(experiment.strategy))
    rows = []
    for label, layers in sub_models(meta.num_layers, depths, draws, seed):
        for suffix, method in methods[:1] if len(layers) == meta.num_layers else methods:
            extras = method.stand_ins.to_send(dict(own), layers, meta.num_layers) if own and suffix else None
            model = GlobalModel(experiment.backbone.cache_path, num_classes, method, layers=layers, extras=extras)
            results = model.evaluate(slice_state(state, layers), sets, experiment.training.eval_batch_size)
            rows.append(ProbeRow(label + suffix, tuple(layers), {d: 100 * r["accuracy"] for d, r in results.items()}))
    if calibrate:  # the method's own global model (all-small's is shallow), after "all blocks"
        layers = methods[0][1].global_layers(meta.num_layers) or list(range(meta.num_layers))
        model = GlobalModel(experiment.backbone.cache_path, num_classes, methods[0][1], layers=layers)
        results = model.evaluate(slice_state(calibrated(experiment, meta, state), layers), sets,
                                 experiment.training.eval_batch_size)
        rows.insert(1, ProbeRow("global model, calibrated head", tuple(layers),
                                {d: 100 * r["accuracy"] for d, r in results.items()}))
    return rows


def probe_table(rows: Sequence[ProbeRow]) -> str:
    """Markdown: one row per sub-model, accuracy per domain and the mean."""
    domains = list(rows[0].accuracy)
    lines = ["| sub-model | blocks | " + " | ".join(domains) + " | mean |",
             "|---|---|" + "---|" * (len(domains) + 1)]
    for row in rows:
        blocks = "all" if len(row.layers) == len(rows[0].layers) else " ".join(str(i) for i in row.layers)
        cells = " | ".join(f"{row.accuracy[d]:.1f}" for d in domains)
        lines.append(f"| {row.label} | {blocks} | {cells} | **{row.mean:.1f}** |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: probe one finished run, print (and optionally write) the table."""
    parser = argparse.ArgumentParser(prog="python -m fedra_core.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (holds adapters.safetensors)")
    parser.add_argument("--depths", nargs="+", type=int, default=[3, 6, 9])
    parser.add_argument("--draws", type=int, default=3, help="random sub-models per depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sub-models")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--surrogates", action="store_true",
                        help="also evaluate each shallow sub-model with block surrogates in its skipped positions")
    parser.add_argument("--calibrate", action="store_true",
                        help="also evaluate the global model with its head calibrated from every client's data")
    args = parser.parse_args(argv)
    table = probe_table(probe(args.run_dir, args.depths, args.draws, args.seed, args.surrogates, args.calibrate))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
