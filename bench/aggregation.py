"""Aggregation: masked_average over many clients' ViT-B adapter deltas against one summation pass.

Each client holds a random 3..12 of the 12 blocks (capacities as the paper's), so the
deltas are as sparse as FedRA makes them. The reference is one plain pass that adds
every delta tensor of every client into an accumulator of the same tensors: the least
work any aggregation of these deltas can do.

    python bench/aggregation.py [--clients 10 100 1000]
"""

import argparse
import time

import numpy as np
import torch

from common import machine, table

from fedra_core.aggregation import masked_average  # noqa: E402  (common puts the repo on sys.path)
from fedra_core.allocation import allocate

DIM, MLP, RANK, BLOCKS, CLASSES = 768, 3072, 8, 12, 100


def global_state() -> dict[str, torch.Tensor]:
    """ViT-B/16's LoRA (rank 8 on attn.proj and mlp.fc2) and a 100-class head."""
    state = {}
    for i in range(BLOCKS):
        state[f"blocks.{i}.attn.proj.lora_A.weight"] = torch.randn(RANK, DIM)
        state[f"blocks.{i}.attn.proj.lora_B.weight"] = torch.randn(DIM, RANK)
        state[f"blocks.{i}.mlp.fc2.lora_A.weight"] = torch.randn(RANK, MLP)
        state[f"blocks.{i}.mlp.fc2.lora_B.weight"] = torch.randn(DIM, RANK)
    state["head.weight"] = torch.randn(CLASSES, DIM)
    state["head.bias"] = torch.randn(CLASSES)
    return state


def client_deltas(state: dict[str, torch.Tensor], clients: int, rng: np.random.Generator) -> list[dict]:
    caps = [12, 10, 8, 6, 4, 3] * (clients // 6 + 1)
    matrix = allocate(caps[:clients], BLOCKS, rng)
    deltas = []
    for row in matrix:
        held = {str(i) for i in np.flatnonzero(row)}
        deltas.append({k: torch.randn_like(v) for k, v in state.items()
                       if not k.startswith("blocks.") or k.split(".")[1] in held})
    return deltas


def plain_sum(state: dict[str, torch.Tensor], deltas: list[dict]) -> dict[str, torch.Tensor]:
    acc = {k: torch.zeros_like(v) for k, v in state.items()}
    for key, total in acc.items():  # key-major, like masked_average: each accumulator stays in cache
        for delta in deltas:
            if key in delta:
                total.add_(delta[key])
    return acc


def best_of(fn, repeat: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Time both passes for each client count and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    # One thread for both passes: tensors of 24-96 KiB gain nothing from intra-op threads,
    # and on a shared 2-core machine their spin-waits only add noise.
    torch.set_num_threads(args.threads)
    state = global_state()
    warm = client_deltas(state, 6, np.random.default_rng(0))
    masked_average(state, warm), plain_sum(state, warm)  # first-call costs out of the way
    rows, per_client = [], []
    for clients in args.clients:
        deltas = client_deltas(state, clients, np.random.default_rng(clients))
        mib = sum(v.numel() * 4 for d in deltas for v in d.values()) / 2**20
        ours = best_of(lambda: masked_average(state, deltas))
        weighted = best_of(lambda: masked_average(state, deltas, [float(i % 7 + 1) for i in range(clients)]))
        reference = best_of(lambda: plain_sum(state, deltas))
        per_client.append(ours / clients)
        rows.append([clients, f"{mib:.0f}", f"{reference:.3f}", f"{ours:.3f}", f"{weighted:.3f}",
                     f"{ours / reference:.2f}", f"{1e3 * ours / clients:.2f}"])
        del deltas
    print(f"masked_average over ViT-B/16 adapter deltas (rank {RANK}, attn.proj + mlp.fc2, head); {machine()}")
    print(table(["clients", "MiB of deltas", "plain sum (s)", "masked_average (s)", "weighted (s)",
                 "ratio to plain sum (target <= 3)", "ms per client"], rows))
    spread = max(per_client) / min(per_client)
    print(f"\ntime per client varies by {spread:.2f}x from {args.clients[0]} to {args.clients[-1]} clients "
          "(1.0 = perfectly linear)")


if __name__ == "__main__":
    main()
