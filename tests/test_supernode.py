"""``python -m client_app.supernode``: Flower's SuperNode with its polling waits capped.

The local cluster's nodes run through it (every cluster test exercises it end to end);
these tests pin what it changes inside Flower and that bad values are refused.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supernode import start_client_internal as internal

from client_app import forkserver, supernode
from flower_messages import run_identity  # noqa: F401 - autouse fixture: Flower messages need a run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deploy"))
import local_cluster  # noqa: E402


@pytest.fixture
def restore_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the patch and the environment variable after the test."""
    monkeypatch.setattr(internal, "time", internal.time)
    monkeypatch.delenv(supernode.SUPEREXEC_POLL_ENV, raising=False)


def test_flower_waits_are_capped(restore_flower: None, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert supernode.shorten_waits(0.2)
    internal.time.sleep(3)  # the idle SuperNode's wait between asks for messages
    internal.time.sleep(0.5)  # its wait for a ClientApp's reply to push (a look into its own state)
    internal.time.sleep(0.01)
    assert slept == [0.2, supernode.LOCAL_WAIT, 0.01]
    assert internal.time.monotonic is time.monotonic  # everything else is the time module's
    assert os.environ[supernode.SUPEREXEC_POLL_ENV] == "0.1"  # the SuperExec asks its node for tasks more often


def test_a_foreign_layout_runs_flower_unchanged(restore_flower: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internal, "time", object())
    assert not supernode.shorten_waits(0.2)


@pytest.mark.parametrize("value", ["0", "5", "-1"])
def test_bad_poll_interval_is_refused(value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "client_app.supernode", "--poll-interval", value],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--poll-interval must be between 0.01 and 3 seconds" in result.stderr


def test_local_cluster_refuses_a_bad_poll_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert local_cluster.main(["--poll-interval", "7"]) == 2
    assert "--poll-interval must be 0" in capsys.readouterr().err


def test_local_cluster_starts_nodes_through_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(local_cluster, "spawn", lambda command, log, env: commands.append(command))
    local_cluster.start_supernode(tmp_path, "node-0", 9092, "partition-id=0", {}, None, None, poll=0.2)
    local_cluster.start_supernode(tmp_path, "node-1", 9092, "partition-id=1", {}, None, None)
    assert commands[0][:6] == [sys.executable, "-m", "client_app.supernode", "--poll-interval", "0.2", "--fork-server"]
    assert commands[1][0] == "flower-supernode"


def test_the_lean_launcher_is_flowers_clientapp_without_the_supernode_cli(tmp_path: Path) -> None:
    text = supernode.lean_launcher()
    path = supernode.write_launcher(tmp_path / "bin" / "flwr-clientapp", text)
    assert path.stat().st_mode & 0o777 == 0o700
    assert supernode.write_launcher(path, text) == path  # written once, rewritten only when it differs
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "usage: flwr-clientapp" in result.stdout
    probe = path.read_text().replace("sys.exit(flwr_clientapp())",
                                     "print('flwr.supernode.cli.flower_supernode' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_superexec_finds_the_lean_launcher_first_without_the_fork_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv(forkserver.SOCKET_ENV, "")  # restored (removed) after the test
    folder = supernode.use_fast_clientapp(fork_server=False)
    found = Path(shutil.which("flwr-clientapp") or "")
    assert found.parent == folder and folder.parent.parent == supernode_private_dir()
    assert found.read_text().startswith(f"#!{sys.executable}\n") and "import flwr.supernode" in found.read_text()
    assert os.environ[forkserver.SOCKET_ENV] == ""  # no server started


def test_the_superexec_finds_the_forking_launcher_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    started: list[list[str]] = []

    class NoServer:  # what was started is checked; a real server is started by tests/test_forkserver.py
        def __init__(self, command: list[str], **_: object) -> None:
            started.append(command)

    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv(forkserver.SOCKET_ENV, "")  # restored (removed) after the test
    monkeypatch.setattr(supernode.subprocess, "Popen", NoServer)
    folder = supernode.use_fast_clientapp()
    found = Path(shutil.which("flwr-clientapp") or "")
    assert found.parent == folder and found.read_text().startswith(f"#!{sys.executable} -IS\n")
    assert str(folder / "lean" / "flwr-clientapp") in found.read_text()  # its fallback
    socket_path = os.environ[forkserver.SOCKET_ENV]
    assert started == [[sys.executable, str(supernode.FORKSERVER), "--socket", socket_path, "--parent-pid",
                        str(os.getpid()), "--launcher-dir", str(folder)]]


def supernode_private_dir() -> Path:
    from client_app.worker import private_dir

    return private_dir()  # type: ignore[return-value]


def test_a_deployed_clientapp_reports_when_its_task_reached_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from client_app.app import _arrival

    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    assert _arrival(message) == {}  # not a flwr-clientapp process (simulation, tests): nothing to report
    monkeypatch.setattr(sys, "argv", ["/x/flwr-clientapp"])
    arrival = _arrival(message)
    assert set(arrival) == {"wait-seconds", "startup-seconds", "forked"}
    assert arrival["forked"] == float(os.environ.get(forkserver.FORKED_ENV) == "1")
    assert 0 <= arrival["wait-seconds"] and 0 < arrival["startup-seconds"]
