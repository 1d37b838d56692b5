"""The comparison command on two small finished runs: table, participation and plots."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedra_core import compare
from launched import processes_with_flwr_home

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


def _tiny_base(tmp_path: Path, cache: Path, rounds: int) -> Path:
    """A base experiment small enough to simulate in seconds."""
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 0,
        "backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "max_test_per_domain": 20},
        "clients": {"capacities": [6, 5, 4, 3, 2, 1]},
        "training": {"rounds": rounds, "local_steps": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.003},
    }))
    return base


def test_report_writes_table_and_plots(tmp_path: Path) -> None:
    fedra = _finished_run(tmp_path / "fedra", "fedra", [[[1, 0, 1, 0], [0, 1, 0, 0]],
                                                        [[0, 1, 1, 0], [0, 0, 0, 1]]], [0.8, 0.6])
    depthfl = _finished_run(tmp_path / "depthfl", "depthfl", [[[1, 1, 0, 0], [1, 0, 0, 0]]] * 2, [0.7, 0.3],
                            failed_node=11)

    table = compare.report([fedra, depthfl], tmp_path / "out", title="tiny")

    lines = table.splitlines()
    assert lines[0].startswith("| method | clean | sketch | **mean** | last 5 rounds |")
    assert "| fedra | 80.0 | 60.0 | **70.0** | 52.5 | 0 | 2 | 20 s |" in lines  # rounds 1-2: 35.0, 70.0
    assert "| depthfl | 70.0 | 30.0 | **50.0** | 37.5 | 0 | 2 | 20 s |" in lines
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
    assert "| fedra | 70.0 ± 10.0 | 50.0 ± 10.0 | **60.0 ± 10.0** | 60.0 ± 10.0 | 0,1 |" in compare.results_table(runs)


def _seeded_run(folder: Path, method: str, seed: int, final: list[float]) -> compare.Run:
    path = _finished_run(folder, method, [[[1, 1, 0, 0], [0, 0, 1, 1]]], final)
    config = yaml.safe_load((path / "config.yaml").read_text())
    config["seed"] = seed
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return compare.read_run(path)


def test_differences_are_paired_by_seed(tmp_path: Path) -> None:
    finals = {("fedra", 0): [0.6, 0.4], ("fedra", 1): [0.8, 0.6], ("depthfl", 0): [0.7, 0.5],
              ("depthfl", 1): [0.8, 0.4], ("all-small", 1): [0.5, 0.5]}
    runs = [_seeded_run(tmp_path / f"{m}{s}", m, s, final) for (m, s), final in finals.items()]
    table = compare.paired_table(runs, "fedra").splitlines()
    assert table[0] == "| method − fedra | seed 0 | seed 1 | mean (final) | mean (last 5 rounds) | seeds paired |"
    # depthfl - fedra: +10.0 at seed 0, -10.0 at seed 1 (the final round is the only round evaluated after 0)
    assert "| depthfl | +10.0 / +10.0 | -10.0 / -10.0 | +0.0 ± 10.0 | +0.0 ± 10.0 | 2 |" in table
    assert "| all-small | – | -20.0 / -20.0 | -20.0 | -20.0 | 1 |" in table
    assert compare.paired_table(runs, "inclusivefl") == ""
    written = compare.report([r.path for r in runs], tmp_path / "out")
    assert "minus that of fedra" in written and "| depthfl | +10.0 / +10.0 |" in written
    with pytest.raises(ValueError, match="--paired-with fedx: no run of that method"):
        compare.report([r.path for r in runs], tmp_path / "out", paired_with="fedx")


def test_unfinished_run_and_unknown_method_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        compare.read_run(tmp_path / "empty")
    stopped = _finished_run(tmp_path / "stopped", "depthfl", [[[1, 1, 0, 0], [1, 0, 0, 0]]] * 2, [0.5, 0.5])
    config = yaml.safe_load((stopped / "config.yaml").read_text())
    (stopped / "config.yaml").write_text(yaml.safe_dump({**config, "training": {"rounds": 30}}))
    with pytest.raises(FileNotFoundError, match="unfinished: its last round is 2 of 30"):  # never in a table
        compare.report([stopped], tmp_path / "out")
    with pytest.raises(ValueError, match="'fedx' is not a method"):
        compare.run_all(Path("configs/bench-feature.yaml"), ["fedx"], [0], tmp_path / "out")


@pytest.mark.parametrize("config", ["domainnet-feature.yaml", "nicopp-feature-label.yaml"])
def test_paper_configs_name_missing_data_before_the_first_round(tmp_path: Path, tiny_vit_cache: Path,
                                                                 config: str) -> None:
    from fedra_core.config import load_experiment
    from fedra_core.run import ServerRun

    root = Path(__file__).resolve().parent.parent / "configs" / config
    capacities = [6, 5, 4, 3, 2, 1] * (5 if "label" in config else 1)
    overrides = {"backbone.cache": str(tiny_vit_cache), "training.device": "cpu", "clients.capacities": capacities,
                 "data.root": str(tmp_path / "absent")}
    with pytest.raises(FileNotFoundError, match="dataset root not found: .*absent"):
        ServerRun(load_experiment(root, overrides), tmp_path / "run")
    (tmp_path / "present").mkdir()
    overrides["data.root"] = str(tmp_path / "present")
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*present/(clipart|autumn)_train\.txt"):
        ServerRun(load_experiment(root, overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "rounds.jsonl").exists()


def test_run_simulates_each_method_then_reports(tmp_path: Path, tiny_vit_cache: Path) -> None:
    base = _tiny_base(tmp_path, tiny_vit_cache, rounds=1)
    progress = io.StringIO()

    paths = compare.run_all(base, ["depthfl", "all-small"], [0], tmp_path / "cmp", stream=progress)
    table = compare.report(paths, tmp_path / "cmp")

    assert [p.name for p in paths] == ["tiny-depthfl-s0", "tiny-all-small-s0"]
    assert "1/2 rounds" in progress.getvalue() and "2/2 rounds" in progress.getvalue()
    depthfl, small = (compare.read_run(p) for p in paths)
    assert depthfl.records[1]["allocation"] == [[1] * k + [0] * (6 - k) for k in (6, 5, 4, 3, 2, 1)]
    assert small.records[1]["allocation"] == [[1, 0, 0, 0, 0, 0]] * 6
    assert "| depthfl |" in table and "| all-small |" in table
    again = compare.run_all(base, ["depthfl"], [0], tmp_path / "cmp", stream=io.StringIO())  # finished: skipped
    assert again == paths[:1]


def test_comparison_names_the_failed_run_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture, tiny_vit_cache: Path) -> None:
    fake = tmp_path / "simulate.py"  # stands for deploy/simulate.py ending a run that failed
    fake.write_text("import sys\nprint('round 0 ...')\nprint('simulate.py: run 7 finished:failed: "
                    "ConfigError: resume: no checkpoint', file=sys.stderr)\nsys.exit(1)\n")
    monkeypatch.setattr(compare, "SIMULATE", fake)
    monkeypatch.setattr(compare, "_stop_on_signals", lambda: None)  # pytest keeps its own handlers
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({"name": "tiny", "backbone": {"cache": str(tiny_vit_cache)},
                                    "data": {"domains": ["clean", "sketch"]}, "clients": {"capacities": [2, 1]}}))

    code = compare.main(["run", "--base", str(base), "--methods", "fedra", "--out", str(tmp_path / "cmp")])

    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"compare: tiny-fedra-s0 failed: simulate.py: run 7 finished:failed: ConfigError: resume: "
                    f"no checkpoint (log {tmp_path / 'cmp' / 'logs' / 'tiny-fedra-s0.log'})")


def test_interrupted_comparison_stops_its_servers_and_resumes(tmp_path: Path, tiny_vit_cache: Path) -> None:

    base = _tiny_base(tmp_path, tiny_vit_cache, rounds=3)
    out = tmp_path / "cmp"
    run_dir = out / "runs" / "tiny-fedra-s0"
    command = [sys.executable, "-m", "fedra_core.compare", "run", "--base", str(base), "--methods", "fedra",
               "--out", str(out)]
    proc = subprocess.Popen(command, cwd=compare.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(compare.ROOT)})
    try:
        while proc.poll() is None and not (run_dir / "checkpoint.safetensors").is_file():
            time.sleep(0.5)
        assert proc.poll() is None, "the comparison ended before it could be interrupted"
        assert processes_with_flwr_home(out / ".flwr-home")  # the simulation's SuperLink is up
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_with_flwr_home(out / ".flwr-home") == []  # nothing left running
    done = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert 1 <= done[-1] < 3 and not (run_dir / "results.md").exists()

    paths = compare.run_all(base, ["fedra"], [0], out, stream=io.StringIO())

    assert paths == [run_dir]
    rounds = [json.loads(line)["round"] for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert rounds == list(range(4))  # rounds 0..3 once each: continued, not restarted
    assert "resuming" in (out / "logs" / "tiny-fedra-s0.log").read_text()
    assert (run_dir / "results.md").is_file()


def test_runs_with_surrogates_or_a_calibrated_head_are_told_apart(tmp_path: Path) -> None:
    matrix = [[[1, 1, 0, 0], [0, 0, 1, 1]]]
    variants = {"plain": {}, "every": {"head_calibration": "lda", "calibrate_every": 1},
                "last": {"head_calibration": "lda"}, "both": {"surrogates": "frozen", "head_calibration": "lda"}}
    names = {}
    for name, strategy in variants.items():
        folder = _finished_run(tmp_path / name, "fedra", matrix, [0.5, 0.5])
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["strategy"].update(strategy)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        names[name] = compare.read_run(folder).method
    assert names == {"plain": "fedra", "every": "fedra + lda head (every 1)", "last": "fedra + lda head (last round)",
                     "both": "fedra + surrogates (frozen) + lda head (last round)"}
