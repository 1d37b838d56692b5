"""Evaluation where the data lives: nodes score the global model on their own test splits."""

import json
import subprocess
import sys
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
