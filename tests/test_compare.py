"""The comparison command on two small finished runs: table, participation and plots."""

import json
from pathlib import Path

import pytest
import yaml

from fedra_core import compare

DOMAINS = ["clean", "sketch"]


def _finished_run(folder: Path, method: str, allocations: list[list[list[int]]], final: list[float],
                  failed_node: int | None = None) -> Path:
    """A run folder as a real run writes it: config.yaml and rounds.jsonl (round 0 + rounds)."""
    folder.mkdir(parents=True)
    config = {"name": folder.name, "seed": 0, "strategy": {"method": method}, "run": {"num_layers": 4}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"round": 0, "accuracy": {d: 0.1 for d in DOMAINS}, "mean_accuracy": 0.1, "elapsed_seconds": 1.0}]
    for index, matrix in enumerate(allocations, start=1):
        rows = [{"node_id": 10 + i, "partition_id": i, "domain": DOMAINS[i], "capacity": sum(r)}
                for i, r in enumerate(matrix)]
        clients = [{**row, "status": "failed" if row["node_id"] == failed_node else "ok"} for row in rows]
        accuracy = {d: a * index / len(allocations) for d, a in zip(DOMAINS, final)}
        records.append({"round": index, "method": method, "allocation": matrix, "rows": rows, "clients": clients,
                        "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(DOMAINS),
                        "elapsed_seconds": 10.0 * index})
    (folder / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


def test_report_writes_table_and_plots(tmp_path: Path) -> None:
    fedra = _finished_run(tmp_path / "fedra", "fedra", [[[1, 0, 1, 0], [0, 1, 0, 0]],
                                                        [[0, 1, 1, 0], [0, 0, 0, 1]]], [0.8, 0.6])
    depthfl = _finished_run(tmp_path / "depthfl", "depthfl", [[[1, 1, 0, 0], [1, 0, 0, 0]]] * 2, [0.7, 0.3],
                            failed_node=11)

    table = compare.report([fedra, depthfl], tmp_path / "out", title="tiny")

    lines = table.splitlines()
    assert lines[0].startswith("| method | clean | sketch | **mean** |")
    assert "| fedra | 80.0 | 60.0 | **70.0** | 0 | 2 | 20 s |" in lines
    assert "| depthfl | 70.0 | 30.0 | **50.0** | 0 | 2 | 20 s |" in lines
    written = (tmp_path / "out" / "results.md").read_text()
    assert "| fedra | 1 | 2 | 2 | 1 |" in written  # client-rounds per block, both domains
    assert "| depthfl | 2 | 2 | 0 | 0 |" in written  # the failed client's rows do not count
    for name in ("accuracy.png", "participation.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_participation_counts_per_domain(tmp_path: Path) -> None:
    run = compare.read_run(_finished_run(tmp_path / "r", "fedra", [[[1, 0, 1, 0], [0, 1, 0, 0]]] * 3, [0.5, 0.5]))
    counts, domains = compare.participation(run)
    assert domains == DOMAINS
    assert counts.tolist() == [[3, 0, 3, 0], [0, 3, 0, 0]]


def test_seeds_are_averaged(tmp_path: Path) -> None:
    runs = []
    for seed, final in ((0, [0.6, 0.4]), (1, [0.8, 0.6])):
        path = _finished_run(tmp_path / f"s{seed}", "fedra", [[[1, 1, 0, 0], [0, 0, 1, 1]]], final)
        config = yaml.safe_load((path / "config.yaml").read_text())
        config["seed"] = seed
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        runs.append(compare.read_run(path))
    assert "| fedra | 70.0 ± 10.0 | 50.0 ± 10.0 | **60.0 ± 10.0** | 0,1 |" in compare.results_table(runs)


def test_unfinished_run_and_unknown_method_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        compare.read_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="'fedx' is not a method"):
        compare.run_all(Path("configs/bench-feature.yaml"), ["fedx"], [0], tmp_path / "out")
