"""The node's warm worker: the same results as the ClientApp's own, and never a failed round because of it."""

import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from client_app import worker
from fedra_core.config import experiment_from_dict
from fedra_core.federated import global_model
from fedra_core.lora import slice_state
from fedra_core.task import run_train
from fedra_core.wire import encode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from launched import wait_until  # noqa: E402
DOMAINS = ["clean", "inverted", "sketch"]


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(condition, timeout, what, interval=0.1)


def _exited(process: subprocess.Popen) -> bool:
    return process.poll() is not None


def _start(path: Path, parent: int = os.getpid(), idle: float = 300.0) -> subprocess.Popen:
    command = [sys.executable, "-m", "client_app.worker", "--socket", str(path), "--parent-pid", str(parent),
               "--idle-seconds", str(idle)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _ready(process: subprocess.Popen, path: Path) -> None:
    _wait(lambda: path.exists() or _exited(process), 600, "the worker's socket")
    assert process.poll() is None, "the worker exited before serving"


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """One worker for the tests that leave it running; the last test makes it exit."""
    path = tmp_path_factory.mktemp("worker") / "w.sock"
    process = _start(path)
    try:
        _ready(process, path)
        yield process, path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _task(cache: Path, steps: int = 1) -> tuple[dict, dict, dict]:
    experiment = experiment_from_dict({
        "seed": 4, "backbone": {"cache": str(cache), "lora": {"rank": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "domains": DOMAINS, "max_test_per_domain": 10},
        "clients": {"capacities": [3, 2, 1]},
        # one thread on both sides: a bitwise comparison needs the same reduction order
        "training": {"local_steps": steps, "batch_size": 8, "optimizer": "adamw", "lr": 0.01, "num_threads": 1}})
    state = global_model(experiment, cache, 10, "cpu").initial_state()
    arrays = {}
    for name, array in encode(slice_state(state, [1, 4])).items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        arrays[name] = (str(array.dtype), array.shape, buffer.getvalue())
    config = {"experiment": experiment.to_json(), "layers": [1, 4], "server-round": 2, "wire-dtype": "float32"}
    return config, arrays, {"partition-id": 1}


def test_the_worker_trains_exactly_as_the_clientapp_does(warm: tuple, tiny_vit_cache: Path) -> None:
    _, path = warm
    config, arrays, node_config = _task(tiny_vit_cache)

    status, (delta, metrics) = worker.request(path, "train", config, arrays, node_config)
    status_again, (delta_again, _) = worker.request(path, "train", config, arrays, node_config)
    local, _ = run_train(config, arrays, node_config)

    assert status == status_again == "ok" and metrics["steps"] == 1
    assert set(delta) == set(local) and all(np.array_equal(delta[k], local[k]) for k in local)
    assert all(np.array_equal(delta_again[k], local[k]) for k in local)


def test_a_refused_task_fails_in_the_worker_as_it_would_here(warm: tuple, tiny_vit_cache: Path) -> None:
    _, path = warm
    config, arrays, node_config = _task(tiny_vit_cache)
    with pytest.raises(worker.WorkerTaskError, match="TaskRefused: .*holds at most 1"):
        worker.request(path, "train", config, arrays, {"partition-id": 1, "max-layers": 1})


def test_a_worker_with_other_code_says_stale_and_exits(warm: tuple, tiny_vit_cache: Path) -> None:
    process, path = warm
    config, arrays, node_config = _task(tiny_vit_cache)
    status, reason = worker.request(path, "train", config, arrays, node_config, version="other-code")
    assert status == "stale" and "other-code" in reason
    process.wait(timeout=60)
    assert not path.exists()


def test_a_busy_worker_sends_tasks_back_and_one_killed_mid_task_raises(tmp_path: Path, tiny_vit_cache: Path) -> None:
    path = tmp_path / "w.sock"
    process = _start(path)
    try:
        _ready(process, path)
        long_config, arrays, node_config = _task(tiny_vit_cache, steps=10_000)  # the most a node accepts
        config, _, _ = _task(tiny_vit_cache)
        failure: list[BaseException] = []

        def long_task() -> None:
            try:
                worker.request(path, "train", long_config, arrays, node_config)
            except BaseException as err:  # noqa: BLE001 - the test inspects it
                failure.append(err)

        thread = threading.Thread(target=long_task)
        thread.start()
        _wait(lambda: worker.request(path, "ping", {}, {}, {})[1]["busy"], 300, "the long task to start")
        assert worker.request(path, "train", config, arrays, node_config)[0] == "busy"
        process.kill()  # mid-task: the ClientApp waiting on it sees the connection break
        thread.join(timeout=60)
        assert len(failure) == 1 and isinstance(failure[0], OSError)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_worker_exits_when_its_supernode_is_gone_or_idle(tmp_path: Path) -> None:
    parent = subprocess.Popen(["sleep", "5"])
    for name in ("o.lock", "o.log", "i.lock", "i.log"):  # what worker.start writes beside the socket
        (tmp_path / name).touch()
    orphan, idle = _start(tmp_path / "o.sock", parent=parent.pid), _start(tmp_path / "i.sock", idle=1.0)
    try:
        parent.wait()
        orphan.wait(timeout=600)
        idle.wait(timeout=600)
    finally:
        for process in (orphan, idle):
            if process.poll() is None:
                process.kill()
    assert not (tmp_path / "i.sock").exists() and not (tmp_path / "o.sock").exists()
    # The orphan's lock and log go with it (its SuperNode will start no other); the idle one's stay for the next.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.lock", "i.log"]


def test_the_socket_folder_is_private() -> None:
    folder = worker.private_dir()
    assert folder is not None and folder.stat().st_mode & 0o777 == 0o700


def test_outside_a_deployed_clientapp_the_worker_is_off() -> None:
    assert not worker.enabled({"partition-id": 0})  # pytest is no flwr-clientapp process
    assert worker.call("query", {}, {}, {"partition-id": 0}) is None


# The warm worker in a real deployment (rounds served by it, then its death mid-round):
# tests/test_deployment.py, test_deployed_rounds_use_the_worker_and_survive_its_death.
