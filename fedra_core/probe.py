"""Probe a finished run: its global adapters evaluated through shallow sub-models.

``python -m fedra_core.probe RUN_DIR [--depths 3 6 9] [--draws 3] [--out FILE]``
evaluates the run's final ``adapters.safetensors`` on every domain's test set through
the full model, through the first k blocks (what a depth-first client trains) and
through random k-block sub-models (what a FedRA client trains), and prints a Markdown
table. It shows, for instance, whether a backbone still works with blocks skipped, and
how far a weak client's domain is learned at the depth that client trains.
"""

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from fedra_core.datasets import test_sets
from fedra_core.evaluation import GlobalModel
from fedra_core.lora import slice_state
from fedra_core.methods import method_for
from fedra_core.records import ADAPTERS, RunOutput
from fedra_core.run import check_same_backbone, prepare_backbone


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


def probe(run_dir: Path, depths: Sequence[int] = (3, 6, 9), draws: int = 3, seed: int = 0) -> list[ProbeRow]:
    """Evaluate a finished run's final global state through full and shallow sub-models."""
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
    method = method_for(experiment)
    rows = []
    for label, layers in sub_models(meta.num_layers, depths, draws, seed):
        model = GlobalModel(experiment.backbone.cache_path, num_classes, method, layers=layers)
        results = model.evaluate(slice_state(state, layers), sets, experiment.training.eval_batch_size)
        rows.append(ProbeRow(label, tuple(layers), {d: 100 * r["accuracy"] for d, r in results.items()}))
    return rows


def probe_table(rows: Sequence[ProbeRow]) -> str:
    """Markdown: one row per sub-model, accuracy per domain and the mean."""
    domains = list(rows[0].accuracy)
    lines = ["| sub-model | blocks | " + " | ".join(domains) + " | mean |",
             "|---|---|" + "---|" * (len(domains) + 1)]
    for row in rows:
        blocks = "all" if row.label == "all blocks" else " ".join(str(i) for i in row.layers)
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
    args = parser.parse_args(argv)
    table = probe_table(probe(args.run_dir, args.depths, args.draws, args.seed))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
