"""A real Flower run of the embedded default on a GPU against the same run on the CPU.

``configs/default.yaml`` (six clients holding 12/10/8/6/4/3 blocks of the built-in
backbone) runs on a local TLS cluster (``deploy/local_cluster.py``: SuperLink and six
SuperNodes on this host, each with its warm worker), once with ``training.device: cuda``,
every SuperNode sharing the one GPU, and once on the CPU. Prints the mean round time
(rounds 2.. ; round 1 starts the workers), the slowest client's training, the server's
evaluation, the accuracy after the last round and the GPU memory in use at its peak
(``nvidia-smi``, sampled every 200 ms, all processes together, less what was in use before).

Flower's simulation engine would share the GPU through fractional ``num-gpus``, but it
needs Ray; where Ray is not installed the cluster is the way to share it.

    python bench/gpu_flower.py [--rounds 4] [--precision fp32] [--only cuda]
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import yaml

from common import ROOT, machine, table

EXPERIMENT = ROOT / "configs" / "default.yaml"


class GpuMemory:
    """The largest ``memory.used`` nvidia-smi reports while running, in MiB."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def __enter__(self) -> "GpuMemory":
        if not shutil.which("nvidia-smi"):
            return self
        self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                         "-lms", "200"], stdout=subprocess.PIPE, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def gpu_used() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def run(device: str, precision: str, rounds: int, out: Path) -> dict:
    """One cluster run of the default on ``device``; its round records and the GPU memory peak."""
    values = yaml.safe_load(EXPERIMENT.read_text())
    values["training"].update({"device": device, "precision": precision if device != "cpu" else "fp32",
                               "rounds": rounds})
    values["name"] = f"default-{device}"
    experiment = out / f"default-{device}.yaml"
    experiment.write_text(yaml.safe_dump(values))
    run_config = f"experiment='{experiment}' output-dir='{out}' run-name='{device}'"
    command = [sys.executable, str(ROOT / "deploy" / "local_cluster.py"), "--workdir", str(out / f"{device}-cluster"),
               "--max-layers", ",".join(str(c) for c in values["clients"]["capacities"]), "-c", run_config,
               "--node-config", f"device='{device}'"]
    command += ["--no-proxy"] if not any(Path(p, "nginx").exists() for p in ("/usr/sbin", "/usr/bin")) else []
    before = gpu_used()
    log = out / f"{device}.log"
    with GpuMemory() as memory, log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        sys.exit(f"the {device} run failed (exit {done.returncode}); its log: {log}\n"
                 + "\n".join(log.read_text().splitlines()[-30:]))
    records = [json.loads(line) for line in (out / device / "rounds.jsonl").read_text().splitlines() if line.strip()]
    later = [r for r in records if r["round"] >= 2] or records
    return {"round": float(np.mean([r["round_seconds"] for r in later])),
            "training": float(np.mean([max(c["metrics"]["train_seconds"] for c in r["clients"]
                                           if c["status"] == "ok") for r in later])),
            "images_per_s": float(np.mean([np.mean([c["metrics"]["images_per_second"] for c in r["clients"]
                                                    if c["status"] == "ok"]) for r in later])),
            "evaluation": float(np.mean([r["eval_seconds"] for r in later])),
            "accuracy": records[-1]["mean_accuracy"], "gpu_mib": memory.peak - before,
            "rounds": [r["round_seconds"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--only", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, help="folder for the runs (default: a new temporary one)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedra-gpu-flower-"))
    out.mkdir(parents=True, exist_ok=True)
    devices = [args.only] if args.only else ["cuda", "cpu"]
    results = {}
    for device in devices:
        results[device] = run(device, args.precision, args.rounds, out)
        print(device, json.dumps(results[device]), flush=True)
    (out / "gpu_flower.json").write_text(json.dumps(results, indent=1))
    print(f"{machine()}; {EXPERIMENT.name}, 6 SuperNodes, {args.rounds} rounds, rounds 2.. averaged; "
          f"precision on the GPU {args.precision}; outputs in {out}")
    base = results.get("cpu", {}).get("round")
    print(table(["device", "round (s)", "slowest client's training (s)", "images/s per client",
                 "server evaluation (s)", "accuracy after last round", "GPU memory, peak (MiB)", "round / CPU round"],
                [[d, f"{r['round']:.2f}", f"{r['training']:.2f}", f"{r['images_per_s']:.0f}", f"{r['evaluation']:.2f}",
                  f"{r['accuracy']:.3f}", f"{r['gpu_mib']}" if d != "cpu" else "-",
                  f"{r['round'] / base:.2f}" if base else "-"] for d, r in results.items()]))


if __name__ == "__main__":
    main()
