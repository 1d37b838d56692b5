"""HeteroTune's cost per architecture: trainable parameters, wire bytes and peak memory of a client round.

For each architecture of the built-in family (digits-vit-s: 32 wide, 8 blocks;
digits-vit: 64 wide, 12 blocks; digits-vit-l: 96 wide, 12 blocks; random weights, the
same shapes) it prints, side by side with FedRA's LoRA (rank 8 on attn.proj and mlp.fc2,
and the head) on the same architecture:

- trainable parameters of the whole model (DeMA: private and shared);
- bytes a client holding every block is sent and replies, as Flower serializes them
  (on a state of distinct values: Flower stores identical arrays once);
- peak resident memory of one local training round (20 steps of batch 32 on 24x24
  images), each in a fresh process, and the ratio of the large architecture's to the
  small one's.

    python bench/hetero.py [--steps 20] [--batch 32]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, table

FAMILY = {"s": "digits-vit-s", "m": "digits-vit", "l": "digits-vit-l"}
NUM_CLASSES = 10


def write_family(directory: Path) -> dict[str, Path]:
    """Caches with the family's architectures (random weights) under ``directory``."""
    import torch

    from fedra_core.backbone import import_timm, write_cache
    from fedra_core.pretrain import RECIPES

    timm = import_timm()
    caches = {}
    for name, recipe in FAMILY.items():
        spec = RECIPES[recipe]
        caches[name] = directory / recipe
        if not (caches[name] / "meta.json").is_file():
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = timm.create_model(spec["timm_name"], num_classes=3, **spec["kwargs"])
            write_cache(model, spec["timm_name"], spec["kwargs"], caches[name], source=f"bench:{recipe}")
    return caches


def experiment(caches: dict[str, Path], method: str, steps: int, batch: int) -> dict:
    """The experiment (as a dict) of a hetero run over the family, or of FedRA on one cache."""
    training = {"local_steps": steps, "batch_size": batch, "optimizer": "adamw", "lr": 0.003, "num_threads": 1}
    if method == "fedra":
        return {"backbone": {"lora": {"rank": 8, "alpha": 8, "dropout": 0.0,
                                      "target_modules": ["attn.proj", "mlp.fc2"]}},
                "clients": {"capacities": [12]}, "training": training}
    return {"backbone": {"architectures": [{"name": n, "cache": str(c)} for n, c in caches.items()],
                         "adapter": {"rank": 16, "experts": 4, "slots": 4}},
            "clients": {"capacities": [8, 12, 12], "architectures": list(caches)},
            "strategy": {"method": "hetero"}, "training": training}


def measure(values: dict, cache: str, architecture: str | None) -> dict:
    """In this process: the whole model's state, wire bytes, and the peak RSS of one local round."""
    import torch
    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from torch.utils.data import TensorDataset

    from common import reset_peak_rss, rss_kib
    from fedra_core.backbone import read_meta
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import run_local_round
    from fedra_core.methods import method_for
    from server_app.replies import serialized_bytes
    from server_app.strategy import to_record

    exp = experiment_from_dict(values)
    depth = read_meta(Path(cache)).num_layers
    method = method_for(exp)
    state = GlobalModel(Path(cache), NUM_CLASSES, method, architecture=architecture).initial_state()
    layers = list(range(depth))
    sent = method.sendable(state, layers, architecture, depth)
    shared = sum(v.numel() for k, v in sent.items() if "/" not in k) if architecture else 0
    config = ConfigRecord({"server-round": 1, "layers": layers, "experiment": exp.to_json(),
                           **({"architecture": architecture} if architecture else {})})
    # Flower stores identical arrays once (content addressed): the untrained state's zero tensors would
    # shrink the message, so bytes are counted on a state of distinct values, as after training.
    trained = {k: torch.randn_like(v) for k, v in sent.items()}
    down = serialized_bytes(RecordDict({"arrays": to_record(trained, "float32"), "config": config}))
    up = serialized_bytes(RecordDict({"arrays": to_record(trained, "float32"),
                                      "metrics": MetricRecord({"num-examples": 640})}))
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(640, 3, 24, 24, generator=generator), torch.arange(640) % NUM_CLASSES)
    node = NodeSettings(0, 1, depth, None, Path(cache), "cpu")
    torch.set_num_threads(1)
    reset_peak_rss()
    before = rss_kib()
    result = run_local_round(exp, node, layers, sent, data, NUM_CLASSES, 1, architecture)
    return {"params": sum(v.numel() for v in sent.values()), "shared": shared, "down": down, "up": up,
            "peak_mib": (rss_kib("VmHWM") - before) / 1024, "seconds": result.result.seconds}


def run_child(values: dict, cache: Path, architecture: str | None) -> dict:
    """``measure`` in a fresh interpreter, so each peak is that round's alone."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); from hetero import measure; "
            f"print(json.dumps(measure(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] or None)))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(values), str(cache), architecture or ""],
                         cwd=ROOT, capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1",
                                                                                    "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the per-architecture table and the large/small memory ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    caches = write_family(Path(tempfile.gettempdir()) / "fedra-bench" / "family")
    rows, peaks = [], {}
    for name, cache in caches.items():
        dema = run_child(experiment(caches, "hetero", args.steps, args.batch), cache, name)
        lora = run_child(experiment(caches, "fedra", args.steps, args.batch), cache, None)
        peaks[name] = dema["peak_mib"]
        print(f"{name}: done", file=sys.stderr, flush=True)
        rows.append([f"{name} ({FAMILY[name]})", f"{dema['params']:,} ({dema['shared']:,} shared)",
                     f"{lora['params']:,}", f"{dema['down']:,} / {dema['up']:,}", f"{lora['down']:,} / {lora['up']:,}",
                     f"{dema['down'] / lora['down']:.2f}x", f"{dema['peak_mib']:.0f}", f"{lora['peak_mib']:.0f}",
                     f"{dema['seconds']:.1f} / {lora['seconds']:.1f}"])
    print(f"# HeteroTune per architecture ({machine()}; {args.steps} steps of batch {args.batch}, every block held)\n")
    print(table(["architecture", "DeMA trainable", "LoRA r8 trainable", "DeMA bytes sent / replied",
                 "LoRA bytes sent / replied", "DeMA / LoRA bytes", "DeMA peak MiB", "LoRA peak MiB",
                 "train s DeMA / LoRA"], rows))
    print(f"\nPeak memory of a client round, largest / smallest architecture: {peaks['l'] / peaks['s']:.2f}x "
          f"({peaks['l']:.0f} MiB against {peaks['s']:.0f} MiB)")


if __name__ == "__main__":
    main()
