"""Hostile clients in a real Flower simulation: the run goes on, and the global state stays sound.

The ServerApp is the project's own; the ClientApp (tests/hostile_app) is the project's
own too, with replies corrupted on purpose by some partitions.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))

from simulate import free_port, simulation_pids, stop, write_connection  # noqa: E402

DOMAINS = ["clean", "inverted", "sketch", "noisy", "texture"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_cache: Path) -> tuple[Path, str]:
    tmp_path = tmp_path_factory.mktemp("hostile")
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(yaml.safe_dump({
        "name": "hostile", "seed": 1,
        "backbone": {"cache": str(tiny_vit_cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "domains": DOMAINS, "max_test_per_domain": 20},
        "clients": {"capacities": [6, 4, 3, 2, 2]},
        "strategy": {"reply_timeout": 300, "clip_delta_norm": 5.0, "head_calibration": "lda", "calibrate_every": 1},
        "training": {"rounds": 3, "local_steps": 1, "batch_size": 8, "optimizer": "adamw", "lr": 0.003}}))
    flwr_home, control = tmp_path / "flwr-home", free_port()
    write_connection(flwr_home)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(ROOT / "tests" / "hostile_app"), "--stream",
               "--federation-config", "num-supernodes=5 client-resources-num-cpus=1",
               "--run-config", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}' run-name='hostile'"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=1800)
    finally:
        stop(simulation_pids(control))
    assert (tmp_path / "out" / "hostile" / "adapters.safetensors").is_file(), result.stdout[-4000:]
    return tmp_path / "out" / "hostile", result.stdout + result.stderr


def test_hostile_replies_are_rejected_alone_and_the_run_finishes(hostile_run: tuple[Path, str]) -> None:
    run_dir, _ = hostile_run
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    status = {r["round"]: {c["partition_id"]: c["status"] for c in r["clients"]} for r in records[1:]}
    assert status[1] == {0: "ok", 1: "rejected", 2: "ok", 3: "ok"}  # partition 4 was excluded
    assert status[2] == status[3] == {0: "ok", 1: "rejected", 2: "rejected", 3: "ok"}
    reasons = {c["partition_id"]: c.get("reason", "") for r in records[1:3] for c in r["clients"]}
    assert "num-examples inf" in reasons[1] or "num-examples nan" in reasons[1]
    assert "train-loss must be a finite number" in reasons[2]


def test_client_metrics_stay_in_their_own_record(hostile_run: tuple[Path, str]) -> None:
    run_dir, _ = hostile_run
    first = json.loads((run_dir / "rounds.jsonl").read_text().splitlines()[1])
    liar = next(c for c in first["clients"] if c["node_id"] == first["rows"][2]["node_id"])
    assert liar["partition_id"] == 2 and liar["status"] == "ok" and liar["bytes_sent"] > 0
    assert 0 < liar["num_examples"] <= 8 and isinstance(liar["layers"], list)
    assert set(liar["metrics"]) <= {"train_loss", "train_accuracy", "train_seconds", "setup_seconds",
                                    "total_seconds", "images_per_second", "bytes_read", "steps"}
    assert liar["ignored_metrics"] >= 200 and not any(k.startswith("junk") for k in liar)


def test_a_node_with_a_bad_capacity_is_excluded_and_the_poison_is_clipped(hostile_run: tuple[Path, str]) -> None:
    run_dir, log = hostile_run
    assert "declared num-examples inf" in log
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    poisoner = [c for r in records[1:] for c in r["clients"] if c["partition_id"] == 3]
    assert all(c["status"] == "ok" and c["clipped"] and c["delta_norm"] > 1e38 for c in poisoner)
    honest = [c for r in records[1:] for c in r["clients"] if c["partition_id"] == 0]
    assert all(c["status"] == "ok" and not c["clipped"] for c in honest)  # the others still train
    for name in ("adapters.safetensors", "checkpoint.safetensors"):
        assert all(torch.isfinite(v).all() for v in _tensors(run_dir / name).values()), name


def test_hostile_calibration_sums_are_left_out_and_the_head_stays_sound(hostile_run: tuple[Path, str]) -> None:
    run_dir, _ = hostile_run
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for record in records[1:]:
        calibration = record["calibration"]
        assert calibration["status"] == "ok" and calibration["nodes"] == 1  # partition 0's sums alone
        reasons = {f["partition_id"]: f["reason"] for f in calibration["failures"]}
        assert set(reasons) == {1, 2, 3}
        assert "inconsistent" in reasons[1]
        assert "declared" in reasons[2]
        assert "NaN" in reasons[3]
    head = _tensors(run_dir / "adapters.safetensors")["head.weight"]
    assert torch.isfinite(head).all() and head.abs().max() > 0
