"""Deployment: the time a ClientApp spends before its first training step, per capacity.

In deployment every round's ClientApp runs in a fresh process (flower-superexec), so
process start, imports and sub-model assembly are paid every round. This measures those
phases in fresh processes for a ViT-B/16 cache and k = 3, 6, 12 blocks, the same code
path as the ClientApp's train handler (assemble from the cache, attach LoRA, load the
received state, one training step).

    python bench/client_startup.py [--cache DIR]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table, vit_b_cache

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import flwr.app, flwr.clientapp                     # what the ClientApp module needs first
t1 = time.perf_counter()
import client_app.app                               # the app itself (lazy: no models yet)
t2 = time.perf_counter()
from fedra_core.local import build_submodel         # torch models, timm, peft
from fedra_core.config import experiment_from_dict, resolve_node
from fedra_core.lora import slice_state
import torch
t3 = time.perf_counter()
cache, k = sys.argv[1], int(sys.argv[2])
experiment = experiment_from_dict({"backbone": {"cache": cache}, "clients": {"capacities": [k]}})
node = resolve_node(experiment, {"partition-id": 0})
layers = list(range(0, 12, 12 // k))[:k]
state = json.loads(sys.argv[3])
received = {key: torch.zeros(shape) for key, shape in state.items()}
received = slice_state(received, layers)
t4 = time.perf_counter()
model, _ = build_submodel(experiment, node, layers, 100, received)
t5 = time.perf_counter()
images, labels = torch.randn(8, 3, 224, 224), torch.randint(0, 100, (8,))
loss = torch.nn.functional.cross_entropy(model(images), labels)
loss.backward()
t6 = time.perf_counter()
print(json.dumps({"flwr": t1 - t0, "app": t2 - t1, "models": t3 - t2, "assemble": t5 - t4, "first_step": t6 - t5}))
"""


def state_shapes(cache: Path) -> dict[str, list[int]]:
    """Shapes of the full global trainable state (LoRA of every block + head)."""
    from fedra_core.config import LoraSettings
    from fedra_core.evaluation import GlobalModel

    state = GlobalModel.with_lora(cache, 100, LoraSettings()).initial_state()
    return {k: list(v.shape) for k, v in state.items()}


def main() -> None:
    """Measure each capacity in fresh processes (best of three) and print the phases."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cache = vit_b_cache(args.cache)
    shapes = json.dumps(state_shapes(cache))
    rows = []
    for k in (3, 6, 12):
        best = None
        for _ in range(args.repeat):
            launched = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", PROBE, str(cache), str(k), shapes], capture_output=True,
                                 text=True, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                                       "PATH": "/usr/bin:/bin"})
            phases = json.loads(out.stdout.strip().splitlines()[-1])
            total = sum(v for key, v in phases.items() if key != "first_step")
            if best is None or total < best[0]:
                best = (total, phases, time.perf_counter() - launched)
        total, p, wall = best
        rows.append([k, f"{p['flwr']:.2f}", f"{p['app']:.2f}", f"{p['models']:.2f}", f"{p['assemble']:.2f}",
                     f"{total:.2f}", f"{p['first_step']:.2f}", f"{wall:.2f}"])
    print(f"ViT-B/16 cache at {cache}")
    print(table(["blocks", "import flwr (s)", "import app (s)", "import torch/timm/peft (s)",
                 "assemble + LoRA + load (s)", "before first step (s)", "first step, batch 8 (s)",
                 "whole process incl. interpreter (s)"], rows))


if __name__ == "__main__":
    main()
