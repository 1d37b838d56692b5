"""How the launchers (deploy/simulate.py, deploy/local_cluster.py) put a failure into one line.

The logs below are the ends of real ones (colour codes included) from Flower 1.41.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))

import simulate  # noqa: E402
from simulate import FlwrRun, failure_cause, log_cause, running  # noqa: E402

WRONG_CA = """\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode
INFO:     Uvicorn running on http://127.0.0.1:59251 (Press CTRL+C to quit)
\x1b[91mERROR \x1b[0m:     SSL/TLS handshake error detected.
\x1b[91mERROR \x1b[0m:     Exit Code: 305
Failed to initialize the connection to the SuperLink.
[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate (_ssl.c:1006)
The SuperNode could not establish a connection to the SuperLink.

For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>
INFO:     Shutting down
INFO:     Finished server process [21738]
\x1b[92mINFO \x1b[0m:      SuperExec terminated gracefully.
"""

SERVER_APP_RAISED = """\x1b[91mERROR \x1b[0m:     Simulation raised an exception
Traceback (most recent call last):
  File "/x/fedra_core/run.py", line 34, in check_experiment
    raise ConfigError(f"clients.capacities[{client}] = {capacity} is outside 1..{meta.num_layers} "
fedra_core.config.ConfigError: clients.capacities[5] = 9 is outside 1..6 (the backbone has 6 blocks)
\x1b[91mERROR \x1b[0m:     Exit Code: 700
An unhandled exception occurred when running the simulation.

For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/700.html>
"""


def test_a_flower_error_block_is_the_cause_not_the_shutdown_lines() -> None:
    assert log_cause(WRONG_CA.splitlines()) == (
        "SSL/TLS handshake error detected. | Exit Code: 305 | Failed to initialize the connection to the "
        "SuperLink. | [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
        "certificate (_ssl.c:1006)")


def test_an_exception_is_the_cause_not_flowers_exit_code_summary() -> None:
    assert log_cause(SERVER_APP_RAISED.splitlines()) == (
        "fedra_core.config.ConfigError: clients.capacities[5] = 9 is outside 1..6 (the backbone has 6 blocks)")
    assert log_cause([]) == "(empty log)"


def test_a_failed_run_is_named_by_flowers_details_and_the_exception_type() -> None:
    details = "Simulation failed with exception: clients.capacities[5] = 9 is outside 1..6 (the backbone has 6 blocks)"

    assert failure_cause(details, SERVER_APP_RAISED.splitlines()) == (
        "ConfigError: clients.capacities[5] = 9 is outside 1..6 (the backbone has 6 blocks)")
    assert failure_cause("ServerApp failed with exception: multi\nline", []) == "multi line"
    assert failure_cause("", WRONG_CA.splitlines()).startswith("SSL/TLS handshake error detected.")


def test_outcome_trusts_the_run_status_not_the_exit_code(monkeypatch) -> None:
    statuses = {1: ("finished:completed", ""), 2: ("finished:failed", "ServerApp failed with exception: boom")}
    monkeypatch.setattr(simulate, "run_status", lambda connection, run_id, env: statuses[run_id])

    assert simulate.outcome(FlwrRun(code=0, run_id=1), "local", {}) == (0, "run 1 finished:completed")
    assert simulate.outcome(FlwrRun(code=0, run_id=2), "local", {}) == (1, "run 2 finished:failed: boom")
    no_run = FlwrRun(code=1, run_id=None)
    no_run.lines.extend(["Using SuperLink: local", "\x1b[91mERROR \x1b[0m:     Connection refused"])
    assert simulate.outcome(no_run, "local", {}) == (1, "flwr run started no run: Connection refused")


def test_what_a_killed_launcher_started_ends_with_it(tmp_path: Path) -> None:
    """``kill -9`` leaves a launcher no cleanup; what it started (own sessions) gets SIGTERM from the kernel."""
    script = (f"import sys, time; from pathlib import Path; sys.path.insert(0, {str(ROOT / 'deploy')!r}); "
              f"import local_cluster; process = local_cluster.spawn([{shutil.which('sleep')!r}, '300'], "
              f"Path({str(tmp_path / 'sleep.log')!r}), {{}}); print(process.pid, flush=True); time.sleep(300)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    assert running(child)

    launcher.kill()
    launcher.wait()

    deadline = time.monotonic() + 30
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child)


def test_free_ports_lie_below_the_range_outgoing_connections_take() -> None:
    """A port from bind(0) can be taken as an outgoing connection's source port before the server binds it
    (a SuperNode once failed with "address already in use" that way); the launchers' ports cannot."""
    low, high = simulate._ephemeral_range()
    ports = [simulate.free_port() for _ in range(50)]
    assert all(port in simulate.FIXED_PORTS and not low <= port <= high for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # free when returned


def test_the_cores_go_to_the_nodes_in_proportion_to_the_blocks_they_hold() -> None:
    import local_cluster  # pylint: disable=import-outside-toplevel

    split = local_cluster.split_cores
    assert split([0, 1], [12, 6, 3]) == [[0], [1], [1]]  # the 12-block node alone on a core; 6 + 3 share the other
    assert split([0, 1, 2], [12, 6, 3]) == [[0], [1], [2]]
    assert split(list(range(16)), [12, 6, 3]) == [list(range(9)), list(range(9, 14)), [14, 15]]
    shares = split(list(range(16)), [12, 10, 8, 6, 4, 3])  # the default experiment on 16 cores
    assert [len(s) for s in shares] == [4, 4, 3, 2, 2, 1] and sorted(sum(shares, [])) == list(range(16))
    assert split([0], [3, 12]) == [[0], [0]] and split([5, 7], []) == []


def test_a_node_trains_on_its_cores_and_its_flower_processes_are_not_pinned(tmp_path: Path) -> None:
    import local_cluster  # pylint: disable=import-outside-toplevel

    core = sorted(os.sched_getaffinity(0))[-1]
    env = local_cluster.node_env({"PATH": os.environ["PATH"]}, 1, [core])
    assert env["FEDRA_NODE_CORES"] == str(core) and env["OMP_NUM_THREADS"] == "1"
    assert "FEDRA_NODE_CORES" not in local_cluster.node_env({}, 2)  # --no-pin-cores
    code = ("import json, os; from client_app import worker; before = sorted(os.sched_getaffinity(0)); "
            "worker.pin_training(); print(json.dumps([before, sorted(os.sched_getaffinity(0))]))")
    spawned = local_cluster.spawn([sys.executable, "-c", code], tmp_path / "log", {**env, "PYTHONPATH": str(ROOT)})
    assert spawned.wait(timeout=60) == 0
    before, after = json.loads((tmp_path / "log").read_text())
    assert before == sorted(os.sched_getaffinity(0)) and after == [core]  # started anywhere, training pinned


def test_a_core_list_the_node_cannot_use_is_reported_and_ignored(monkeypatch, caplog) -> None:
    from client_app import worker  # pylint: disable=import-outside-toplevel

    before = os.sched_getaffinity(0)
    for bad in ("x", "100000"):
        monkeypatch.setenv(worker.CORES_ENV, bad)
        worker.pin_training()
        assert os.sched_getaffinity(0) == before
    assert caplog.text.count("FEDRA_NODE_CORES") == 2
