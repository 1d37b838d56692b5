"""Framework overhead in simulation: a round's wall time against the clients' own work.

Runs an experiment in Flower's simulation (or reads a finished run's rounds.jsonl) and
compares, round by round, the wall time of training + evaluation with
(a) the slowest client's own time plus the server's evaluation (the issue's yardstick,
which assumes every client has its own cores), and (b) the least time the clients'
work can take on this machine: their summed time spread over the parallel slots
(cores / cores per client), plus the evaluation.

    python bench/round_overhead.py --rounds 6                  # runs configs/default.yaml
    python bench/round_overhead.py --rounds-file outputs/default/rounds.jsonl
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, table


def analyse(records: list[dict], slots: int) -> list[list[str]]:
    """Per-run averages over the trained rounds and the three ratios."""
    trained = [r for r in records if r.get("clients")]
    ok = [[c for c in r["clients"] if c["status"] == "ok"] for r in trained]
    wall = np.array([r["train_wall_seconds"] + r["eval_seconds"] for r in trained])
    evaluation = np.array([r["eval_seconds"] for r in trained])
    slowest = np.array([max(c["metrics"]["total_seconds"] for c in cs) for cs in ok])
    summed = np.array([sum(c["metrics"]["total_seconds"] for c in cs) for cs in ok])
    setup = np.mean([c["metrics"]["setup_seconds"] for cs in ok for c in cs])
    floor = np.maximum(slowest, summed / slots) + evaluation
    return [
        ["rounds measured", f"{len(trained)}", ""],
        ["round wall time, training + evaluation (s)", f"{wall.mean():.2f}", ""],
        ["slowest client, whole ClientApp call (s)", f"{slowest.mean():.2f}", ""],
        ["all clients summed (s)", f"{summed.mean():.2f}", f"over {slots} parallel slots"],
        ["server evaluation (s)", f"{evaluation.mean():.2f}", ""],
        ["client setup before training: assembly, load (s, mean)", f"{setup:.3f}", ""],
        ["wall / (slowest client + evaluation)", f"{(wall / (slowest + evaluation)).mean():.2f}", "target <= 1.5"],
        ["wall / (clients' work over the slots + evaluation)", f"{(wall / floor).mean():.2f}",
         "1.0 = no framework overhead on this machine"],
    ]


def run_default(rounds: int, cpus_per_client: int) -> Path:
    """Run configs/default.yaml for a few rounds in simulation; return its rounds.jsonl."""
    out = Path(tempfile.mkdtemp(prefix="fedra-overhead-"))
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(out / "flwr"),
               "--cpus-per-client", str(cpus_per_client),
               "-c", f"output-dir='{out}' run-name='overhead' num-server-rounds={rounds}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    return out / "overhead" / "rounds.jsonl"


def main() -> None:
    """Print the overhead table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds-file", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    args = parser.parse_args()
    path = args.rounds_file or run_default(args.rounds, args.cpus_per_client)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    slots = max(1, (os.cpu_count() or 1) // args.cpus_per_client)
    print(f"{path}: {os.cpu_count()} cores, {args.cpus_per_client} per client")
    print(table(["quantity", "value", "note"], analyse(records, slots)))


if __name__ == "__main__":
    main()
