"""Resume: a run stopped after a checkpoint and resumed ends exactly as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from launched import stop_launcher  # noqa: E402
from launched import complete_records as _records  # noqa: E402
from launched import tiny_experiment as _experiment  # noqa: E402
from launched import wait_until as _wait  # noqa: E402


def _simulate(tmp_path: Path, run_config: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "flwr-home"),
               "-c", run_config]
    log = open(tmp_path / f"sim-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)


def _checkpoint_round(run_dir: Path) -> int:
    try:
        with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as f:
            return int(f.metadata()["round"])
    except (OSError, KeyError, ValueError):
        return 0


def _adapters(run_dir: Path) -> dict:
    with safe_open(str(run_dir / "adapters.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("strategy", [{}, {"method": "inclusivefl", "inclusivefl_momentum": 0.5}],
                         ids=["fedra", "inclusivefl-momentum"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path, tiny_vit_cache: Path, strategy: dict) -> None:
    rounds = 6  # room for the interrupt to land before the end: with 3 a fast host finished first
    experiment = _experiment(tmp_path, tiny_vit_cache, rounds=rounds, **strategy)
    out = tmp_path / "out"
    base = f"experiment='{experiment}' output-dir='{out}'"
    runs = {"full": _simulate(tmp_path, f"{base} run-name='full'")}
    try:
        assert runs["full"].wait(timeout=900) == 0
        runs["cut"] = _simulate(tmp_path, f"{base} run-name='cut'")
        _wait(lambda: _checkpoint_round(out / "cut") >= 1, 900, "the checkpoint of round 1", interval=0.05)
        os.killpg(runs["cut"].pid, signal.SIGINT)  # the launcher stops its SuperLink by PID
        runs["cut"].wait(timeout=120)
        stopped_at = _checkpoint_round(out / "cut")
        assert 1 <= stopped_at < rounds and not (out / "cut" / "adapters.safetensors").exists()
        with open(out / "cut" / "rounds.jsonl", "a") as records:
            records.write('{"round": 9, "accur')  # a line torn by kill -9 while it was appended
        runs["resume"] = _simulate(tmp_path, f"{base} run-name='cut' resume=true")
        assert runs["resume"].wait(timeout=900) == 0
    finally:
        for process in runs.values():
            stop_launcher(process)

    full, resumed = _records(out / "full"), _records(out / "cut")
    assert [r["round"] for r in resumed] == list(range(rounds + 1))
    for a, b in zip(full[1:], resumed[1:]):
        assert a["allocation"] == b["allocation"]
        assert [(r["partition_id"], r["capacity"]) for r in a["rows"]] == \
            [(r["partition_id"], r["capacity"]) for r in b["rows"]]
    expected, actual = _adapters(out / "full"), _adapters(out / "cut")
    assert set(expected) == set(actual)
    for key in expected:
        assert np.allclose(expected[key].numpy(), actual[key].numpy(), atol=1e-5), key
