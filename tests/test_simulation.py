"""A real Flower simulation through the user's entry point (deploy/simulate.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
CAPACITIES = [6, 5, 4, 3, 2, 1]
sys.path.insert(0, str(ROOT / "tests"))

from launched import processes_with_flwr_home, stop_launcher  # noqa: E402


def _experiment(tmp_path: Path, cache: Path, **training: object) -> Path:
    values = {
        "name": "tiny",
        "seed": 3,
        "backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "max_test_per_domain": 40},
        "clients": {"capacities": CAPACITIES},
        "training": {"rounds": 2, "local_steps": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003,
                     **training},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _simulate(tmp_path: Path, run_config: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "flwr-home"),
               "-c", run_config]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1800)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_cache: Path) -> tuple[Path, str]:
    tmp_path = tmp_path_factory.mktemp("sim")
    experiment = _experiment(tmp_path, tiny_vit_cache)
    pyproject = (ROOT / "pyproject.toml").read_text()
    result = _simulate(tmp_path, f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.fullmatch(r"simulate.py: run \d+ finished:completed", result.stdout.strip().splitlines()[-1])
    assert (ROOT / "pyproject.toml").read_text() == pyproject  # its [tool.flwr.federations] was not migrated
    return tmp_path / "out" / "tiny", result.stdout + result.stderr


def test_run_writes_every_output(finished_run: tuple[Path, str]) -> None:
    run_dir, _ = finished_run
    for name in ("config.yaml", "rounds.jsonl", "adapters.safetensors", "checkpoint.safetensors",
                 "accuracy.png", "allocation.png", "results.md"):
        assert (run_dir / name).is_file(), name
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["clients"]["capacities"] == CAPACITIES and config["training"]["rounds"] == 2


def test_rounds_follow_the_declared_capacities(finished_run: tuple[Path, str]) -> None:
    run_dir, _ = finished_run
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        rows = {row["partition_id"]: sum(alloc) for row, alloc in zip(record["rows"], record["allocation"])}
        assert rows == dict(enumerate(CAPACITIES))
        assert all(c["status"] == "ok" and c["bytes_sent"] > 0 and c["bytes_received"] > 0 for c in record["clients"])
        assert set(record["accuracy"]) == {"clean", "inverted", "noisy", "color", "texture", "sketch"}
        assert 0.0 <= record["mean_accuracy"] <= 1.0


def test_adapters_cover_every_block_under_global_names(finished_run: tuple[Path, str]) -> None:
    run_dir, log = finished_run
    with safe_open(str(run_dir / "adapters.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.")}
    assert blocks == set(range(6))
    assert {"head.weight", "head.bias"} <= keys
    assert "round 2/2" in log and "mean accuracy" in log


def test_bad_experiment_fails_before_flower_starts(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache)
    values = yaml.safe_load(experiment.read_text())
    values["clients"]["capacities"] = [6, 5, 4, 3, 2, 9]  # the backbone has 6 blocks
    experiment.write_text(yaml.safe_dump(values))
    result = _simulate(tmp_path, f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"simulate.py: {experiment}: clients.capacities[5] = 9 is outside 1..6 (the backbone has 6 blocks)"
    assert not (tmp_path / "flwr-home").exists() and not (tmp_path / "out").exists()


def test_run_that_fails_in_the_server_app_exits_1_with_its_cause(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache)
    # Nothing to resume: only the ServerApp can tell, once Flower runs it; `flwr run` itself exits 0.
    result = _simulate(tmp_path, f"experiment='{experiment}' output-dir='{tmp_path / 'out'}' "
                                 "run-name='never-ran' resume=true")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"simulate.py: run \d+ finished:failed: ConfigError: resume: .*never-ran.*", last), last
    assert processes_with_flwr_home(tmp_path / "flwr-home") == []


def test_simulation_stops_everything_on_sighup(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache, rounds=50)
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "flwr-home"),
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "out" / "tiny" / "rounds.jsonl").is_file():  # the simulation is under way
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.5)
        assert processes_with_flwr_home(tmp_path / "flwr-home")  # SuperLink, SuperExec, simulation

        os.killpg(launcher.pid, signal.SIGHUP)  # the terminal closed: its whole process group gets SIGHUP

        assert launcher.wait(timeout=120) == 130
    finally:
        stop_launcher(launcher)
    assert processes_with_flwr_home(tmp_path / "flwr-home") == []


def test_probe_evaluates_the_finished_run_through_sub_models(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    from fedra_core import probe

    run_dir, _ = finished_run
    rows = probe.probe(run_dir, depths=[2, 6], draws=2)

    assert [(r.label, len(r.layers)) for r in rows] == [("all blocks", 6), ("first 2", 2), ("random 2", 2),
                                                         ("random 2", 2)]
    assert rows[1].layers == (0, 1)
    final = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()][-1]
    assert rows[0].accuracy == pytest.approx({d: 100 * a for d, a in final["accuracy"].items()})  # the server's own figure
    out = tmp_path / "probe.md"
    probe.main([str(run_dir), "--depths", "3", "--draws", "1", "--out", str(out)])
    assert "| first 3 | 0 1 2 |" in out.read_text()


def test_probe_refuses_a_run_tuned_on_other_weights(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    from fedra_core import probe
    from fedra_core.config import ConfigError

    run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    assert "backbone_source" in config["run"]
    config["run"]["backbone_source"] = "builtin:digits-vit:seed=0:recipe=000000000000"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="recipe=000000000000"):
        probe.probe(copy)
    (copy / "adapters.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapters.safetensors is missing"):
        probe.probe(copy)


def test_probe_calibrates_the_head_from_every_clients_features(finished_run: tuple[Path, str]) -> None:
    import torch
    from safetensors.torch import load_file

    from fedra_core import probe
    from fedra_core.calibration import discriminant_head, head_features, statistics
    from fedra_core.config import resolve_node
    from fedra_core.datasets import client_data, test_sets
    from fedra_core.evaluation import GlobalModel
    from fedra_core.methods import method_for
    from fedra_core.records import RunOutput
    from fedra_core.run import prepare_backbone

    run_dir, _ = finished_run
    rows = probe.probe(run_dir, depths=[2], draws=0, calibrate=True)

    assert [(r.label, len(r.layers)) for r in rows] == [("all blocks", 6), ("global model, calibrated head", 6),
                                                         ("first 2", 2)]
    experiment = RunOutput(run_dir).read_config()
    meta = prepare_backbone(experiment)
    state = load_file(str(run_dir / "adapters.safetensors"))
    model = GlobalModel(experiment.backbone.cache_path, test_sets(experiment, meta)[1], method_for(experiment))
    model.load(state)
    pooled = None
    for partition in range(experiment.num_clients):  # every client's training images, in one place
        node = resolve_node(experiment, {"partition-id": partition, "num-partitions": experiment.num_clients})
        data = client_data(experiment, node, meta)
        sums = statistics(*head_features(model.model, data.train, 64), data.num_classes)
        pooled = sums if pooled is None else pooled + sums
    expected, _, _ = discriminant_head(pooled, state["head.weight"], state["head.bias"])
    head = probe.calibrated(experiment, meta, state)["head.weight"]
    torch.testing.assert_close(head, expected.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(head, state["head.weight"])
    assert "| global model, calibrated head | all |" in probe.probe_table(rows)
