"""What head calibration costs a node and the server, against a training round.

For the built-in backbone (``digits-vit``), a node with ``--images`` training images
(1,438: a domain of the built-in benchmark) and the extreme benchmark's training round
(4 of 12 blocks, 20 steps of batch 32), each measured in a fresh process:

- the node's time and peak resident memory: its training round; its calibration sums
  with the whole model in memory; the same sums with the model streamed block by block
  from its cache (a node that cannot hold it);
- the bytes of each message as Flower serializes it: train task and reply, calibration
  request (the whole global state) and reply (the three sums);
- the server's time to set the head from the pooled sums, and the reply's size, for
  digits-vit (64 wide, 10 classes) and ViT-B/16 (768 wide) with DomainNet's 345 classes.

    python bench/calibration.py [--images 1438] [--steps 20] [--batch 32]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, table

NUM_CLASSES = 10
CACHE = Path("~/.cache/fedra/backbones/digits-vit").expanduser()
HELD = [0, 3, 6, 9]


def experiment(steps: int, batch: int) -> dict:
    """The extreme benchmark's settings with head calibration."""
    return {"backbone": {"cache": str(CACHE), "builtin": "digits-vit",
                         "lora": {"rank": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["attn.proj", "mlp.fc2"]}},
            "clients": {"capacities": [4] * 6}, "strategy": {"head_calibration": "lda"},
            "training": {"local_steps": steps, "batch_size": batch, "optimizer": "adamw", "lr": 0.003,
                         "num_threads": 1, "eval_batch_size": 512}}


def measure(values: dict, what: str, images: int) -> dict:
    """In this process: seconds and peak RSS of one train round or one calibration (``memory``/``streamed``)."""
    import torch
    from flwr.app import ConfigRecord, RecordDict
    from torch.utils.data import TensorDataset

    from common import reset_peak_rss, rss_kib
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.evaluation import GlobalModel
    from fedra_core.federated import statistics_on_node
    from fedra_core.local import run_local_round
    from fedra_core.methods import method_for
    from server_app.replies import serialized_bytes
    from server_app.strategy import to_record

    exp = experiment_from_dict(values)
    method = method_for(exp)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.05
             for k, v in GlobalModel(CACHE, NUM_CLASSES, method).initial_state().items()}
    data = TensorDataset(torch.randn(images, 3, 24, 24, generator=generator), torch.arange(images) % NUM_CLASSES)
    torch.set_num_threads(1)
    config = ConfigRecord({"server-round": 1, "experiment": exp.to_json()})
    reset_peak_rss()
    before, start = rss_kib(), time.perf_counter()
    if what == "train":
        node = NodeSettings(0, 1, len(HELD), None, CACHE, "cpu")
        sent = method.sendable(state, HELD)
        result = run_local_round(exp, node, HELD, sent, data, NUM_CLASSES, 1)
        sizes = {"request": serialized_bytes(RecordDict({"arrays": to_record(sent, "float32"), "config": config})),
                 "reply": serialized_bytes(RecordDict({"arrays": to_record(result.delta, "float32")}))}
    else:
        own = len(HELD) if what == "streamed" else None
        node = NodeSettings(0, 1, len(HELD), None, CACHE, "cpu", own_max_layers=own)
        meta = type("Meta", (), {"num_layers": 12})()
        holder = type("Data", (), {"train": data, "num_classes": NUM_CLASSES})()
        stats = statistics_on_node(exp, node, meta, holder, state)
        sizes = {"request": serialized_bytes(RecordDict({"arrays": to_record(state, "float32"), "config": config})),
                 "reply": serialized_bytes(RecordDict({"arrays": to_record(stats.to_arrays(), "float32")}))}
    return {"seconds": time.perf_counter() - start, "peak_mib": (rss_kib("VmHWM") - before) / 1024, **sizes}


def run_child(values: dict, what: str, images: int) -> dict:
    """``measure`` in a fresh interpreter, so each peak is that task's alone."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); from calibration import measure; "
            "print(json.dumps(measure(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(values), what, str(images)], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_step(dim: int, classes: int, nodes: int = 6, per_node: int = 1438) -> tuple[float, int]:
    """Seconds to pool ``nodes`` replies and set a ``classes`` x ``dim`` head, and one reply's bytes (float32)."""
    import torch

    from fedra_core.calibration import calibrate_state, statistics

    generator = torch.Generator().manual_seed(0)
    replies = [statistics(torch.randn(per_node, dim, generator=generator),
                          torch.randint(0, classes, (per_node,), generator=generator), classes) for _ in range(nodes)]
    state = {"head.weight": torch.zeros(classes, dim), "head.bias": torch.zeros(classes)}
    start = time.perf_counter()
    calibrate_state(state, replies)
    return time.perf_counter() - start, 4 * (dim * dim + classes * dim + classes)


def main() -> None:
    """Print the node table and the server table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1438)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from fedra_core.pretrain import ensure_builtin_backbone

    ensure_builtin_backbone(CACHE, "digits-vit")
    values = experiment(args.steps, args.batch)
    results = {}
    for what in ("train", "memory", "streamed"):
        results[what] = run_child(values, what, args.images)
        print(f"{what}: done", file=sys.stderr, flush=True)
    train = results["train"]
    print(f"# Head calibration: cost ({machine()})\n")
    print(f"A node on digits-vit: its training round (4 of 12 blocks, {args.steps} steps of batch {args.batch}) "
          f"and its calibration sums over {args.images:,} training images, one thread.\n")
    rows = []
    for what, label in (("train", "training round"), ("memory", "calibration, model in memory"),
                        ("streamed", "calibration, model streamed")):
        r = results[what]
        rows.append([label, f"{r['seconds']:.2f}", f"{r['seconds'] / train['seconds']:.2f}x",
                     f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / train['peak_mib']:.2f}x",
                     f"{r['request']:,}", f"{r['reply']:,}"])
    print(table(["task", "seconds", "vs training", "peak MiB", "vs training", "request bytes", "reply bytes"], rows))
    torch.set_num_threads(1)
    server = [("digits-vit", 64, 10), ("ViT-B/16, DomainNet", 768, 345)]
    rows = []
    for label, dim, classes in server:
        seconds, size = server_step(dim, classes)
        rows.append([label, f"{dim}", f"{classes}", f"{size:,}", f"{seconds:.3f}"])
    print("\nThe server: pooling 6 nodes' sums and setting the head (float64, one thread)\n")
    print(table(["backbone", "width", "classes", "reply bytes (float32 sums)", "seconds"], rows))


if __name__ == "__main__":
    main()
