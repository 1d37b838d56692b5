"""Scale: a simulation with 100 clients, a few sampled per round, on this machine.

Writes an experiment with 100 clients (5 built-in domains x 20 clients, capacities
cycling 12/10/8/6/4/3), runs it in Flower's simulation for each number of clients per
round, and reports the peak memory of every process of the run (SuperLink, ServerApp,
Ray workers: all processes carrying the run's FLWR_HOME) and the round time.

    python bench/scale.py [--per-round 5 10 20] [--rounds 4]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from common import ROOT, table

DOMAINS = ["clean", "inverted", "noisy", "color", "texture"]


def experiment(path: Path, per_round: int, rounds: int) -> Path:
    """The 100-client experiment file."""
    caps = [12, 10, 8, 6, 4, 3]
    values = {
        "name": f"scale-{per_round}",
        "backbone": {"cache": "~/.cache/fedra/backbones/digits-vit", "builtin": "digits-vit"},
        "data": {"dataset": "builtin-digits", "domains": DOMAINS, "clients_per_domain": 20,
                 "max_test_per_domain": 200},
        "clients": {"capacities": [caps[i % len(caps)] for i in range(100)]},
        "strategy": {"method": "fedra", "clients_per_round": per_round},
        "training": {"rounds": rounds, "local_steps": 4, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
    }
    path.write_text(yaml.safe_dump(values))
    return path


def tree_rss_mib(marker: str) -> float:
    """Summed RSS of every process whose environment holds ``marker`` (shared pages counted per process)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() not in (entry / "environ").read_bytes():
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run(per_round: int, rounds: int, work: Path) -> dict[str, float]:
    """One simulation; peak memory sampled every 0.5 s while it runs."""
    home = work / f"flwr-{per_round}"
    config = experiment(work / f"scale-{per_round}.yaml", per_round, rounds)
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(home),
               "--num-supernodes", "100",
               "-c", f"experiment='{config}' output-dir='{work}' run-name='scale-{per_round}'"]
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], tree_rss_mib(f"FLWR_HOME={home}"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    records = [json.loads(line) for line in (work / f"scale-{per_round}" / "rounds.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("clients")]
    return {"peak_mib": peak[0], "round_s": sum(r["round_seconds"] for r in trained) / len(trained),
            "elapsed_s": elapsed, "clients": len(trained[0]["clients"]),
            "failed": sum(len(r["failures"]) for r in trained)}


def main() -> None:
    """Run each setting and print memory and round time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-round", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedra-scale-"))
    rows = []
    for per_round in args.per_round:
        result = run(per_round, args.rounds, work)
        rows.append([100, per_round, result["clients"], f"{result['peak_mib']:.0f}", f"{result['round_s']:.1f}",
                     f"{result['elapsed_s']:.0f}", result["failed"]])
        print(f"done: {per_round} per round", file=sys.stderr, flush=True)
    print(table(["clients", "per round", "trained per round", "peak memory of the run (MiB, summed RSS)",
                 "round time (s)", "whole run (s)", "failed replies"], rows))


if __name__ == "__main__":
    main()
