"""Deployment round time against simulation round time, with and without the warm node worker.

The same 3-client experiment (deploy/cluster.yaml: capacities 12, 6, 3 on the built-in
backbone) runs six ways, one after the other on this machine:

1. in Flower's simulation engine (``deploy/simulate.py``),
2. on a local TLS cluster (``deploy/local_cluster.py``: SuperLink, proxy, 3 SuperNodes)
   with the warm worker, the ClientApp fork server and each node on its share of the
   cores (the defaults), with every node on every core (``--no-pin-cores``),
   and with the worker but a fresh ``flwr-clientapp`` process per message (``--no-fork-server``),
3. on the same cluster with Flower's own SuperNode (``--poll-interval 0``: it waits 3 s
   between asks for messages when idle, its SuperExec 1 s between asks for tasks),
4. on the cluster with ``worker=off`` (every ClientApp process imports torch and loads the data itself).

Round 1 is left out of the means (the worker starts during the capacity query and round 0).
Where the time goes is read from each run's ``rounds.jsonl``: the wall time of a round,
the slowest ClientApp call, the server's evaluation.

    python bench/deploy_round.py --rounds 5
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT, machine, table

EXPERIMENT = "deploy/cluster.yaml"


def run(kind: str, out: Path, rounds: int, poll: float = 0.2) -> list[dict]:
    """One run of the experiment; its round records."""
    run_config = f"experiment='{EXPERIMENT}' output-dir='{out}' run-name='{kind}' num-server-rounds={rounds}"
    if kind == "simulation":
        command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(out / "flwr-sim"),
                   "-c", run_config]
    else:
        command = [sys.executable, str(ROOT / "deploy" / "local_cluster.py"), "--workdir", str(out / f"{kind}-cluster"),
                   "--max-layers", "12,6,3", "-c", run_config]
        if kind == "worker-off":
            command += ["--node-config", "worker='off'"]
        if kind == "no-fork-server":
            command += ["--no-fork-server"]
        if kind == "no-pin":
            command += ["--no-pin-cores"]
        command += ["--poll-interval", "0" if kind == "flower-waits" else str(poll)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    path = out / kind / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(records: list[dict]) -> dict[str, float]:
    """Mean per-round figures over rounds 2.. (seconds)."""
    later = [r for r in records if r["round"] >= 2]
    slowest = [max(c["metrics"]["total_seconds"] for c in r["clients"] if c["status"] == "ok") for r in later]
    training = [max(c["metrics"]["train_seconds"] for c in r["clients"] if c["status"] == "ok") for r in later]
    warm = [np.mean([c["metrics"].get("worker", 0) for c in r["clients"]]) for r in later]
    wait = [max(c["metrics"].get("wait_seconds", 0) for c in r["clients"] if c["status"] == "ok") for r in later]
    startup = [max(c["metrics"].get("startup_seconds", 0) for c in r["clients"] if c["status"] == "ok") for r in later]
    return {"round": float(np.mean([r["round_seconds"] for r in later])),
            "slowest_call": float(np.mean(slowest)), "training": float(np.mean(training)),
            "evaluation": float(np.mean([r["eval_seconds"] for r in later])), "warm_share": float(np.mean(warm)),
            "wait": float(np.mean(wait)), "startup": float(np.mean(startup))}


def main() -> None:
    """Run the six ways (or those --only names, and the simulation) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="the SuperNodes' longest wait between polls in the cluster runs (local_cluster.py's)")
    parser.add_argument("--only", nargs="+",
                        choices=["worker-on", "no-pin", "no-fork-server", "flower-waits", "worker-off"],
                        help="cluster runs to make (default all; the simulation always runs)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedra-deploy-round-"))
    kinds = {"simulation": "simulation", "cluster, worker on": "worker-on",
             "cluster, worker on, every node on every core": "no-pin",
             "cluster, worker on, fresh ClientApp processes": "no-fork-server",
             "cluster, worker on, Flower's 3 s / 1 s polls": "flower-waits", "cluster, worker off": "worker-off"}
    kinds = {label: kind for label, kind in kinds.items() if kind == "simulation" or not args.only or kind in args.only}
    results = {label: summary(run(kind, out, args.rounds, args.poll_interval)) for label, kind in kinds.items()}
    print(f"{machine()}; {EXPERIMENT}, rounds 2..{args.rounds} averaged, --poll-interval {args.poll_interval}; "
          f"outputs in {out}")
    rows = [[kind, f"{r['round']:.1f}", f"{r['slowest_call']:.1f}", f"{r['training']:.1f}", f"{r['evaluation']:.1f}",
             f"{r['wait']:.1f}", f"{r['startup']:.1f}", f"{100 * r['warm_share']:.0f}%",
             f"{r['round'] / results['simulation']['round']:.2f}"] for kind, r in results.items()]
    print(table(["run", "round (s)", "slowest ClientApp call (s)", "its training (s)", "server evaluation (s)",
                 "task sent to handler, slowest (s)", "of it, ClientApp process start (s)", "calls served warm",
                 "round / simulation round"], rows))
    print("target: cluster with the worker <= 1.3 x simulation")


if __name__ == "__main__":
    main()
