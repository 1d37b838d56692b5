"""Experiment files and node settings: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from fedra_core.config import ConfigError, experiment_from_dict, load_experiment, resolve_node

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        experiment = load_experiment(path)
        assert experiment.num_clients >= 1, path


def test_default_matches_the_paper_capacities() -> None:
    experiment = load_experiment(ROOT / "configs" / "default.yaml")
    assert experiment.clients.capacities == (12, 10, 8, 6, 4, 3)
    assert experiment.backbone.lora.target_modules == ("attn.proj", "mlp.fc2")
    assert experiment.backbone.lora.rank == 8 and experiment.backbone.lora.alpha == 8


def test_round_trip_through_json() -> None:
    experiment = load_experiment(ROOT / "configs" / "default.yaml")
    assert experiment_from_dict(experiment.to_dict()) == experiment


def test_overrides_use_dotted_keys() -> None:
    experiment = load_experiment(ROOT / "configs" / "default.yaml", {"training.rounds": 3, "seed": 7})
    assert experiment.training.rounds == 3 and experiment.seed == 7


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"training": {"roundz": 3}}, "unknown key training.roundz"),
        ({"colour": 1}, "unknown key colour"),
        ({"training": {"rounds": 0}}, "training.rounds"),
        ({"training": {"lr": "fast"}}, "training.lr: expected a number"),
        ({"training": {"device": "gpu"}}, "training.device"),
        ({"strategy": {"method": "fedx"}}, "strategy.method"),
        ({"backbone": {"lora": {"dropout": 1.5}}}, "backbone.lora.dropout"),
        ({"data": {"dataset": "domainnet"}}, "data.root"),
        ({"clients": {"capacities": []}}, "clients.capacities"),
        ({"training": None, "data": {"partitioning": "label"}}, "data.partitioning"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        experiment_from_dict(values)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(broken)


def test_node_config_wins_over_the_experiment() -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [12, 3]}})
    simulated = resolve_node(experiment, {"partition-id": 1, "num-partitions": 2})
    assert simulated.max_layers == 3 and simulated.device == "cpu"
    deployed = resolve_node(experiment, {"partition-id": 1, "max-layers": 5, "device": "cuda:1",
                                         "data-root": "/data", "backbone-cache": "/cache/vit"})
    assert (deployed.max_layers, deployed.device, deployed.data_root) == (5, "cuda:1", "/data")
    assert str(deployed.backbone_cache) == "/cache/vit"


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "partition-id' is missing"),
        ({"partition-id": 2}, "partition-id 2 is outside"),
        ({"partition-id": 0, "max-layers": "many"}, "max-layers='many' is not an integer"),
        ({"partition-id": 0, "device": "tpu"}, "device"),
        ({"partition-id": 0, "colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_bad_node_config(node_config: dict, message: str) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [12, 3]}})
    with pytest.raises(ConfigError, match=message):
        resolve_node(experiment, node_config)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": {"depthfl_distill_ramp_rounds": 0}}, "strategy.depthfl_distill_ramp_rounds"),
        ({"strategy": {"inclusivefl_momentum": 1.0}}, "strategy.inclusivefl_momentum"),
    ],
)
def test_bad_baseline_settings_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        experiment_from_dict(values)


def test_paper_and_bench_configs_ramp_depthfl_over_their_rounds() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith(("domainnet-", "nicopp-", "bench-")) and not path.stem.endswith("-sd"):
            experiment = load_experiment(path)
            assert experiment.strategy.depthfl_distill_ramp_rounds == experiment.training.rounds, path


def test_paper_configs_use_the_reference_codes_lora_targets() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith(("domainnet-", "nicopp-")):
            lora = load_experiment(path).backbone.lora
            assert lora.target_modules == ("proj", "mlp.fc2") and (lora.rank, lora.alpha, lora.dropout) == (8, 8, 0.1)
