"""Plots of a run: accuracy per round, and the allocation matrices as heat maps."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_round_plot(fig: Any, ax: Any, path: Path, ylabel: str, title: str, legend_columns: int = 1) -> Path:
    """Label an accuracy-per-round plot (x: round), write it to ``path`` and close it."""
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=legend_columns)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_accuracy(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Mean and per-domain accuracy of the global model against the round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    evaluated = [r for r in records if r.get("accuracy")]
    rounds = [r["round"] for r in evaluated]
    # A domain can miss a round when its nodes evaluate and all of them failed (evaluation.mode clients).
    for domain in dict.fromkeys(d for r in evaluated for d in r["accuracy"]):
        ax.plot(rounds, [100 * r["accuracy"].get(domain, np.nan) for r in evaluated], lw=1, alpha=0.6,
                label=domain)
    ax.plot(rounds, [100 * r["mean_accuracy"] for r in evaluated], "k-", lw=2.5, label="mean")
    return save_round_plot(fig, ax, path, "accuracy of the global model (%)",
                           title or "Global model accuracy per domain", legend_columns=2)


def plot_allocations(records: Sequence[dict[str, Any]], path: Path, max_rounds: int = 6) -> Path:
    """The first rounds' allocation matrices, and how often each client held each block."""
    plt = _pyplot()
    with_alloc = [r for r in records if r.get("allocation")]
    shown = with_alloc[:max_rounds]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(2.6 * (len(shown) + 1) + 1, 3.2), squeeze=False)
    for ax, record in zip(axes[0], shown):
        matrix = np.array(record["allocation"])
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"round {record['round']}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_yticks(range(len(matrix)))
        ax.set_yticklabels([_row_label(row) for row in record.get("rows", [])] or None, fontsize=7)
    counts = _participation(with_alloc)
    ax = axes[0][-1]
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_title(f"held, {len(with_alloc)} rounds", fontsize=9)
    ax.set_xlabel("block")
    ax.set_ylabel("partition")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _row_label(row: dict[str, Any]) -> str:
    label = f"p{row.get('partition_id')}"
    return f"{label} {row['domain']}" if row.get("domain") else label


def _participation(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """(partitions, blocks) count of rounds in which each partition held each block."""
    if not records:
        return np.zeros((1, 1))
    num_blocks = len(records[0]["allocation"][0])
    num_parts = 1 + max(row["partition_id"] for r in records for row in r["rows"])
    counts = np.zeros((num_parts, num_blocks))
    for record in records:
        for row, alloc in zip(record["rows"], record["allocation"]):
            counts[row["partition_id"]] += np.array(alloc)
    return counts


def plot_architectures(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Mean accuracy over the domains of each architecture's global model against the round (HeteroTune)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    evaluated = [r for r in records if r.get("architectures")]
    rounds = [r["round"] for r in evaluated]
    for arch in dict.fromkeys(a for r in evaluated for a in r["architectures"]):
        ax.plot(rounds, [100 * r["architectures"].get(arch, {}).get("mean_accuracy", np.nan) for r in evaluated],
                lw=2, label=arch)
    return save_round_plot(fig, ax, path, "mean accuracy over the domains (%)",
                           title or "Each architecture's global model")
