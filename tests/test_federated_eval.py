"""Evaluation where the data lives: nodes score the global model on their own test splits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedra_core.config import ConfigError, experiment_from_dict
from fedra_core.federated import NodeEvaluation, aggregate_evaluations
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import FedRA, NodeInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from launched import group_members  # noqa: E402
DOMAINS = ["clean", "inverted", "sketch"]


def _experiment(tmp_path: Path, cache: Path, **evaluation: object) -> Path:
    values = {
        "name": "tiny", "seed": 2,
        "backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "domains": DOMAINS, "max_test_per_domain": 30},
        "clients": {"capacities": [6, 4, 2]},
        "training": {"rounds": 2, "local_steps": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
        "evaluation": evaluation,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


def test_nodes_and_server_score_the_same_model_alike(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache, mode="both")
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "flwr-home"),
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = _records(tmp_path / "out" / "tiny")
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        nodes = record["client_eval"]
        assert record["evaluated_by"] == "server" and not nodes["failures"]
        assert sorted(n["partition_id"] for n in nodes["nodes"]) == [0, 1, 2]
        for domain in DOMAINS:  # the same model on the same test items
            assert nodes["accuracy"][domain] == pytest.approx(record["accuracy"][domain], abs=1e-6)
            assert nodes["loss"][domain] == pytest.approx(record["loss"][domain], rel=1e-4)
        assert nodes["mean_accuracy"] == pytest.approx(record["mean_accuracy"], abs=1e-6)


def test_a_server_without_data_needs_the_number_of_classes(tmp_path: Path, tiny_vit_cache: Path) -> None:
    from fedra_core.run import ServerRun

    values = {"backbone": {"cache": str(tiny_vit_cache)}, "clients": {"capacities": [2, 2]},
              "data": {"dataset": "folder", "root": str(tmp_path / "absent")}, "evaluation": {"mode": "clients"}}
    with pytest.raises(ConfigError, match="data.num_classes must say the number of classes"):
        ServerRun(experiment_from_dict(values), tmp_path / "a")
    values["data"]["num_classes"] = 4
    run = ServerRun(experiment_from_dict(values), tmp_path / "b")
    assert run.test_sets == {} and run.num_classes == 4 and run.state["head.weight"].shape[0] == 4


def _strategy() -> tuple[FedRA, StaticGrid]:
    experiment = experiment_from_dict({"clients": {"capacities": [2, 2, 2]}, "evaluation": {"mode": "clients"},
                                       "training": {"rounds": 4}})
    strategy = FedRA(experiment, 2, np.random.default_rng(0))
    strategy.nodes = {n: NodeInfo(n, i, 2, ["a", "a", "b"][i], 10) for i, n in enumerate([1, 2, 3])}
    return strategy, StaticGrid([1, 2, 3])


def _eval_reply(sent: Message, **metrics: object) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)  # type: ignore[arg-type]


def test_evaluations_are_checked_and_aggregated_per_domain() -> None:
    strategy, grid = _strategy()
    state = ArrayRecord({"head.weight": torch.zeros(3, 2)})
    first, second, third = strategy.configure_evaluate(1, state, ConfigRecord(), grid)
    assert all(set(m.content["arrays"].keys()) == {"head.weight"} for m in (first, second, third))

    strategy.aggregate_evaluate(1, [
        _eval_reply(first, **{"eval-loss": 1.0, "eval-accuracy": 0.5, "num-examples": 10}),
        _eval_reply(second, **{"eval-loss": 2.0, "eval-accuracy": 1.7, "num-examples": 10}),  # impossible
        Message(Error(code=0, reason="node crashed"), reply_to=third),
    ])

    record = strategy.last_eval
    assert record["accuracy"] == {"a": 0.5} and record["mean_accuracy"] == 0.5
    reasons = {f["partition_id"]: (f["status"], f["reason"]) for f in record["failures"]}
    assert reasons[1][0] == "rejected" and "within 0..1" in reasons[1][1]
    assert reasons[2] == ("failed", "node crashed")


def test_nodes_evaluate_only_when_due() -> None:
    strategy, grid = _strategy()
    strategy.experiment = experiment_from_dict({"clients": {"capacities": [2, 2, 2]}, "training": {"rounds": 4},
                                                "evaluation": {"mode": "clients", "every": 3}})
    state = ArrayRecord({"head.weight": torch.zeros(3, 2)})
    due = [r for r in range(1, 5) if list(strategy.configure_evaluate(r, state, ConfigRecord(), grid))]
    assert due == [3, 4]  # every third round, and the last


def test_domain_accuracy_weights_nodes_by_count() -> None:
    record = aggregate_evaluations([NodeEvaluation(1, 0, "a", 1.0, 1.0, 30), NodeEvaluation(2, 1, "a", 3.0, 0.0, 10),
                                    NodeEvaluation(3, 2, "b", 0.5, 0.5, 20)], [])
    assert record["accuracy"] == {"a": 0.75, "b": 0.5} and record["loss"]["a"] == 1.5
    assert record["mean_accuracy"] == 0.625 and record["weighted_accuracy"] == pytest.approx(40 / 60)


# ----------------------------------------------------------------- on a real cluster, no data on the server
def _write_folder_dataset(root: Path, domains: list[str], classes: int = 2, per_class: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(domains):
        for c in range(classes):
            folder = root / domain / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                base = np.full((16, 16, 3), 40 + 160 * c, dtype=np.uint8)
                noise = rng.integers(0, 40 + 20 * d, size=base.shape, dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i}.png")


def test_a_cluster_whose_server_has_no_data_is_evaluated_by_its_nodes(tmp_path: Path, tiny_vit_cache: Path) -> None:
    data = tmp_path / "node-data"  # only the nodes are given it
    _write_folder_dataset(data, DOMAINS)
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 2,
        "backbone": {"cache": str(tiny_vit_cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "folder", "root": str(tmp_path / "not-on-the-server"), "domains": DOMAINS,
                 "num_classes": 2},
        "clients": {"capacities": [6, 4, 2]},
        "strategy": {"reply_timeout": 300, "head_calibration": "lda", "calibrate_every": 1},
        "training": {"rounds": 2, "local_steps": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.003},
        "evaluation": {"mode": "clients"}}))
    workdir, run_dir = tmp_path / "cluster", tmp_path / "out" / "tiny"
    command = [sys.executable, str(ROOT / "deploy" / "local_cluster.py"), "--workdir", str(workdir),
               "--max-layers", "6,4,2", "--node-config", f"data-root='{data}'",
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while "evaluate the global model of round 2" not in log.read_text(errors="replace"):
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        node = json.loads((workdir / "pids.json").read_text())["node-2"]
        for pid in group_members(os.getpgid(node)):  # node 2, its worker and ClientApps die mid-evaluation
            os.kill(pid, signal.SIGKILL)
        assert launcher.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)

    records = _records(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert record["evaluated_by"] == "clients" and set(record["accuracy"]) <= set(DOMAINS)
    for record in records[:2]:  # every node evaluated, node 2 (2 of 6 blocks) by streaming the model
        assert sorted(n["partition_id"] for n in record["client_eval"]["nodes"]) == [0, 1, 2]
        assert set(record["accuracy"]) == set(DOMAINS)
    for record in records[1:]:  # the head calibrated from every node's sums, node 2's streamed
        calibration = record["calibration"]
        assert calibration["status"] == "ok" and calibration["nodes"] == 3, calibration
        assert {c["partition_id"]: c["streamed"] for c in calibration["clients"]} == {0: 0.0, 1: 1.0, 2: 1.0}
    last = records[2]["client_eval"]
    assert sorted(n["partition_id"] for n in last["nodes"]) == [0, 1]
    assert [f["partition_id"] for f in last["failures"]] == [2]
    assert (run_dir / "adapters.safetensors").is_file()
