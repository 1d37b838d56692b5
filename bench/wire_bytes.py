"""Bytes on the wire per client per round, as Flower serializes them, against raw tensor bytes.

For a ViT-B/16 with the paper's LoRA (rank 8 on attn.proj and mlp.fc2) and a 100-class
head, a client holding k blocks is sent the adapters of its k blocks plus the head and
the round's configuration (the experiment, its block list), and replies with deltas of
the same tensors plus its metrics. Both directions are serialized by Flower's own
record classes and counted; float32 and bfloat16 on the wire are shown side by side.

    python bench/wire_bytes.py
"""

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common import machine, table

from aggregation import global_state  # noqa: E402  (same ViT-B/16 adapter state)
from fedra_core.config import Experiment
from fedra_core.lora import slice_state
from server_app.replies import serialized_bytes
from server_app.strategy import to_record


def message_bytes(state: dict[str, torch.Tensor], layers: list[int], wire_dtype: str) -> tuple[int, int, int]:
    """Raw bytes of the client's tensors, serialized bytes sent, serialized bytes replied."""
    sent = slice_state(state, layers)
    raw = sum(v.numel() * v.element_size() for v in sent.values())
    config = ConfigRecord({"server-round": 7, "layers": layers, "wire-dtype": wire_dtype,
                           "experiment": Experiment().to_json()})
    down = RecordDict({"arrays": to_record(sent, wire_dtype), "config": config})
    metrics = MetricRecord({"num-examples": 1000, "train-loss": 1.0, "train-accuracy": 0.5, "train-seconds": 9.0,
                            "setup-seconds": 1.0, "total-seconds": 10.0, "images-per-second": 100.0,
                            "bytes-read": 1, "steps": 8})
    up = RecordDict({"arrays": to_record(sent, wire_dtype), "metrics": metrics})
    return raw, serialized_bytes(down), serialized_bytes(up)


def main() -> None:
    """Print bytes and ratios for k = 3, 6, 12 in both wire dtypes."""
    torch.manual_seed(0)
    state = global_state()
    rows = []
    for k in (3, 6, 12):
        layers = sorted(np.random.default_rng(k).choice(12, size=k, replace=False).tolist())
        raw, down32, up32 = message_bytes(state, layers, "float32")
        _, down16, up16 = message_bytes(state, layers, "bfloat16")
        rows.append([k, f"{raw / 1024:.1f}", f"{down32 / 1024:.1f}", f"{up32 / 1024:.1f}",
                     f"{down32 / raw:.4f}", f"{up32 / raw:.4f}", f"{down16 / 1024:.1f}", f"{up16 / 1024:.1f}",
                     f"{down16 / down32:.3f}"])
    print(f"ViT-B/16 LoRA r=8 (attn.proj, mlp.fc2) + 100-class head; {machine()}")
    print(table(["blocks", "raw KiB (fp32)", "sent KiB", "replied KiB", "sent / raw (target <= 1.05)",
                 "replied / raw (target <= 1.05)", "bf16 sent KiB", "bf16 replied KiB", "bf16 / fp32 sent"], rows))


if __name__ == "__main__":
    main()
