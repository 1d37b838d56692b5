"""The SuperNode's ClientApp fork server (``client_app/forkserver.py``) and its ``flwr-clientapp`` launcher.

A real server process and the real launcher; the forked processes run ``forkserver_entry.report``
(what they were given) instead of Flower's runtime, except in the test that runs Flower's own
``flwr-clientapp --help`` through it. The deployment tests run whole rounds through it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client_app import forkserver, supernode

TESTS = Path(__file__).resolve().parent
FALLBACK = "#!/bin/sh\necho fallback \"$@\"\n"


class Fixture:
    def __init__(self, folder: Path, server: subprocess.Popen, socket_path: Path, launcher: Path) -> None:
        self.folder, self.server, self.socket_path, self.launcher = folder, server, socket_path, launcher

    def run(self, *args: str, stdin: str = "", **kwargs) -> subprocess.CompletedProcess:
        env = {**os.environ, forkserver.SOCKET_ENV: str(self.socket_path), "FORKSERVER_TEST_VALUE": "from-launcher"}
        return subprocess.run([str(self.launcher), *args], input=stdin, capture_output=True, text=True, env=env,
                              timeout=120, **kwargs)


def start_server(folder: Path, entry: str = "forkserver_entry:report") -> tuple[subprocess.Popen, Path]:
    """A fork server whose parent is this test process; waits until it listens."""
    path = folder / "fs.sock"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    server = subprocess.Popen([sys.executable, str(supernode.FORKSERVER), "--socket", str(path), "--parent-pid",
                               str(os.getpid()), "--launcher-dir", str(folder), "--entry", entry],
                              env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not path.exists():
        assert server.poll() is None, "the fork server exited before listening"
        assert time.monotonic() < deadline, "the fork server never listened"
        time.sleep(0.05)
    return server, path


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Fixture]:
    folder = tmp_path / "bin"
    folder.mkdir(mode=0o700)
    fallback = supernode.write_launcher(folder / "lean" / "flwr-clientapp", FALLBACK)
    launcher = supernode.write_launcher(folder / "flwr-clientapp", forkserver.LAUNCHER.format(
        python=sys.executable, fallback=str(fallback), env=forkserver.SOCKET_ENV))
    server, path = start_server(folder)
    try:
        yield Fixture(folder, server, path, launcher)
    finally:
        stop(server)


def test_a_launch_is_forked_with_the_launchers_arguments_environment_folder_and_streams(
        served: Fixture, tmp_path: Path) -> None:
    result = served.run("--token", "x y", stdin="hello\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["ppid"] == served.server.pid  # forked from the server, not a fresh interpreter
    assert seen["argv"] == [str(served.launcher), "--token", "x y"]
    assert seen["cwd"] == str(tmp_path) and seen["stdin"] == "hello"
    assert seen["env"] == "from-launcher" and seen["forked"] == "1"
    assert seen["sigterm"]  # the server's own SIGTERM handler is not inherited
    assert result.stderr.strip() == "to stderr"
    again = json.loads(served.run().stdout)
    assert again["pid"] != seen["pid"] and again["ppid"] == served.server.pid  # one process per launch


def test_the_exit_status_comes_back(served: Fixture) -> None:
    assert served.run("exit", "3").returncode == 3


def test_a_signal_to_the_launcher_reaches_the_forked_process(served: Fixture) -> None:
    env = {**os.environ, forkserver.SOCKET_ENV: str(served.socket_path)}
    launcher = subprocess.Popen([str(served.launcher), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
    try:
        launcher.stdin.write("\n")
        launcher.stdin.flush()
        child = json.loads(launcher.stdout.readline())["pid"]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == -signal.SIGTERM  # the child died of it, and the launcher says so
    finally:
        launcher.kill()
        launcher.wait()
    assert not Path(f"/proc/{child}").exists() or "\nState:\tZ" in Path(f"/proc/{child}/status").read_text()


def test_without_a_server_the_launcher_runs_the_plain_clientapp(served: Fixture) -> None:
    stop(served.server)
    assert not served.socket_path.exists()  # the server removes its socket when it stops
    result = served.run("--token", "x")
    assert result.returncode == 0 and result.stdout.strip() == "fallback --token x"
    env = {**os.environ}
    env.pop(forkserver.SOCKET_ENV, None)
    result = subprocess.run([str(served.launcher), "a"], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "fallback a"


def test_garbage_on_the_socket_is_refused_and_the_server_serves_on(served: Fixture) -> None:
    for payload in (b"", b"\x00\x00\x00\x05{not json", b"\xff\xff\xff\xff", b"\x00\x00\x00\x05[1,2]",
                    b"\x00\x00\x00\x0d{\"argv\": \"x\"}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(served.socket_path))
            if payload:
                socket.send_fds(sock, [payload], [0, 1, 2])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""  # refused: no process started
    assert served.server.poll() is None
    assert json.loads(served.run().stdout)["ppid"] == served.server.pid


def test_the_server_exits_when_its_parent_is_gone(tmp_path: Path) -> None:
    """Started by a short-lived parent (as by a SuperNode that then dies): it exits and removes its socket."""
    folder = tmp_path / "bin"
    folder.mkdir()
    code = (f"import subprocess, sys, time, os; p = subprocess.Popen([sys.executable, {str(supernode.FORKSERVER)!r}, "
            f"'--socket', {str(folder / 'fs.sock')!r}, '--parent-pid', str(os.getpid()), '--launcher-dir', "
            f"{str(folder)!r}]); print(p.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 300
        while not (folder / "fs.sock").exists():
            assert time.monotonic() < deadline, "the fork server never listened"
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while Path(f"/proc/{server}").exists() and "\nState:\tZ" not in Path(f"/proc/{server}/status").read_text():
            assert time.monotonic() < deadline, "the fork server outlived its parent"
            time.sleep(0.05)
    finally:
        try:
            os.kill(server, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (folder / "fs.sock").exists()


def test_flowers_clientapp_runs_forked(tmp_path: Path) -> None:
    """The default entry: Flower's ``flwr-clientapp`` command itself, forked (its usage, its exit code)."""
    folder = tmp_path / "bin"
    folder.mkdir(mode=0o700)
    lean = supernode.write_launcher(folder / "lean" / "flwr-clientapp",
                                    supernode.lean_launcher())
    launcher = supernode.write_launcher(folder / "flwr-clientapp", forkserver.LAUNCHER.format(
        python=sys.executable, fallback=str(lean), env=forkserver.SOCKET_ENV))
    server, path = start_server(folder, forkserver.ENTRY)
    try:
        env = {**os.environ, forkserver.SOCKET_ENV: str(path)}
        result = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0 and "usage: flwr-clientapp" in result.stdout
        result = subprocess.run([str(launcher), "--no-such-flag"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 2 and "flwr-clientapp: error: one of the arguments --token" in result.stderr
    finally:
        stop(server)


def test_clientapps_and_nodes_ask_again_for_a_message_part_within_a_fraction_of_a_second() -> None:
    """Flower's first wait for a missing part is 1 s; in the launched ClientApps 0.02 s, in the nodes 0.05 s."""
    code = ("import sys; from flwr.supercore.inflatable import inflatable_utils as u; from client_app import "
            "forkserver, supernode; before = dict(u.pull_and_inflate_object_from_tree.__kwdefaults__); "
            "forkserver.prompt_pulls() if sys.argv[1] == 'clientapp' else "
            "forkserver.prompt_pulls(initial=supernode.NODE_PULL_WAIT, cap=1.0); "
            "after = u.pull_objects.__kwdefaults__; "
            "print(before['initial_backoff'], after['initial_backoff'], after['backoff_cap'], after['max_time'], "
            "u.pull_and_inflate_object_from_tree.__kwdefaults__['initial_backoff'])")
    for kind, expected in (("clientapp", ["1", "0.02", "0.2", "7200", "0.02"]),
                           ("node", ["1", "0.05", "1.0", "7200", "0.05"])):
        result = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True, check=True,
                                cwd=TESTS.parent)
        assert result.stdout.split() == expected
    lean = supernode.lean_launcher()
    assert "def prompt_pulls" in lean and "prompt_pulls()" in lean  # the plain launcher waits as briefly


def test_an_installed_fab_is_not_unpacked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The forked ClientApp finds the FAB's folder from its bytes; a new FAB still goes through Flower's install."""
    import flwr.cli.install as flower_install
    from flwr.cli.build import build_fab_from_disk
    from flwr.supernode.runtime import run_clientapp as runtime

    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "__init__.py").write_text("")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "tiny"\nversion = "1.0.0"\n'
        '[tool.flwr.app]\npublisher = "me"\n'
        '[tool.flwr.app.components]\nserverapp = "pkg:s"\nclientapp = "pkg:c"\n')
    fab = build_fab_from_disk(app)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(runtime, "install_from_fab", runtime.install_from_fab)  # restored after the test
    forkserver.quick_fab_install()
    installed = runtime.install_from_fab(fab, skip_prompt=True)  # not installed yet: Flower's own install
    assert (installed / "pkg" / "__init__.py").is_file() and installed.parent == tmp_path / "home" / "apps"

    def no_unpacking(*_: object, **__: object) -> None:
        raise AssertionError("the FAB was unpacked again")

    monkeypatch.setattr(flower_install, "safe_extract_zip", no_unpacking)
    assert runtime.install_from_fab(fab, skip_prompt=True) == installed
    (app / "pkg" / "more.py").write_text("x = 1\n")
    with pytest.raises(AssertionError, match="unpacked again"):  # other bytes, other folder: Flower installs it
        runtime.install_from_fab(build_fab_from_disk(app), skip_prompt=True)
