"""A SuperNode's ClientApp fork server: every ``flwr-clientapp`` process forked from one that
has already imported Flower, instead of a fresh Python that imports it again.

Flower 1.41's SuperExec starts a new ``flwr-clientapp`` process for every message. On a
2-core machine its start costs 1-2 s before the handler runs, most of it importing Flower
and NumPy (three nodes starting theirs at once share the cores). ``python -m
client_app.supernode`` starts this server beside the SuperNode and puts a small
``flwr-clientapp`` first on its SuperExec's PATH: a Python started without ``site``
(milliseconds) that connects to the server's Unix socket (in this user's private, 0700
folder), hands over its arguments, environment, working folder and standard streams,
forwards the signals it receives to the forked process and exits with its status. The
forked process runs Flower's ClientApp runtime exactly as the fresh one would: it pulls
the task and the FAB, loads the app from the FAB and pushes the reply.

The server never imports the app (Flower would then reuse that module instead of the
FAB's), so it is never stale for new code; it exits when its SuperNode is gone. When it
is absent, starting or gone, the small launcher runs the plain one (a fresh process).

    python client_app/forkserver.py --socket PATH --parent-pid PID --launcher-dir FOLDER
"""

import argparse
import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

HEADER = struct.Struct("!I")
MAX_REQUEST = 4 * 2**20  # arguments and environment: far below this
STREAMS = 3  # stdin, stdout, stderr
SOCKET_ENV = "FEDRA_CLIENTAPP_FORKSERVER"  # where the launcher finds the server
FORKED_ENV = "FEDRA_CLIENTAPP_FORKED"  # set in a forked ClientApp process (its replies say so)
ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"  # what a forked process runs
PR_SET_PDEATHSIG = 1

# The ``flwr-clientapp`` the SuperExec runs: no third-party import, no ``site``.
LAUNCHER = """#!{python} -IS
# flwr-clientapp forked from a warm server (written by client_app.supernode; see client_app/forkserver.py).
import json, os, signal, socket, struct, sys

FALLBACK = {fallback!r}
HEADER = struct.Struct("!I")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def fallback():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.execv(FALLBACK, [FALLBACK, *sys.argv[1:]])


def lines(sock):
    buffer = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return
        buffer += chunk
        while b"\\n" in buffer:
            line, buffer = buffer.split(b"\\n", 1)
            yield json.loads(line)


signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)  # held until they can be forwarded to the forked process
path = os.environ.get({env!r}, "")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(path)
    request = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(sock, [HEADER.pack(len(request)) + request], [0, 1, 2])
    replies = lines(sock)
    pid = next(replies)["pid"]
except (OSError, ValueError, KeyError, TypeError, StopIteration):
    sock.close()
    fallback()
for number in FORWARDED:
    signal.signal(number, lambda signum, _frame: os.kill(pid, signum))
signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
code = 1
try:
    for reply in replies:
        code = reply["exit"]
except (OSError, ValueError, KeyError, TypeError):
    pass
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def prompt_pulls(initial: float = 0.02, cap: float = 0.2) -> None:
    """Ask again for a message part that is not there yet after ``initial`` seconds, doubling up to ``cap``.

    Flower waits 1 s, 2 s, ... (up to 10 s) before asking again, in two places where a
    part is often missing for a moment: a SuperNode sees a task on the SuperLink before
    the ServerApp has pushed all its parts, and the SuperExec launches a ClientApp as soon
    as its node holds a message's header, while the node is still pulling the parts. In
    a round of seconds each such wait cost a second. A ClientApp asks its own node on
    this host (default 0.02 s growing to 0.2 s); a SuperNode asks the SuperLink
    (``client_app.supernode``: 0.05 s growing to 1 s). Flower's limit of 7200 s on the
    whole pull is unchanged."""
    from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=import-outside-toplevel

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        if {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(defaults):
            defaults.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=10**7)


def quick_fab_install() -> None:
    """Skip unpacking a FAB that Flower has already installed (about 0.1 s of every ClientApp's start).

    Flower's ClientApp unpacks the run's FAB into a temporary folder and checks every
    file's hash, then finds the FAB installed already (the folder named after the hash of
    the FAB's bytes) and uses that. Here the folder's name is computed from the same bytes
    first, and an existing one is used as Flower would; a FAB not installed yet, or any
    surprise, goes through Flower's own installation."""
    # pylint: disable=import-outside-toplevel
    import hashlib
    import io
    import tomllib
    import zipfile

    from flwr.common.config import get_metadata_from_config
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp as runtime

    flower_install = runtime.install_from_fab

    def install_from_fab(fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        if isinstance(fab_file, bytes) and install_dir is None:
            try:
                digest = hashlib.sha256(fab_file).hexdigest()[:FAB_HASH_TRUNCATION]
                with zipfile.ZipFile(io.BytesIO(fab_file)) as archive:
                    config = tomllib.loads(archive.read("pyproject.toml").decode())
                fab_id, version = get_metadata_from_config(config)
                publisher, name = fab_id.split("/")
                installed = get_flwr_home() / APP_DIR / f"{publisher}.{name}.{version}.{digest}"
                if installed.is_dir():
                    return installed
            except Exception:  # pylint: disable=broad-exception-caught
                pass
        return flower_install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)

    runtime.install_from_fab = install_from_fab


def warm_imports(entry: str) -> Callable[[], object]:
    """What a ``flwr-clientapp`` process imports before its task (Flower's ClientApp runtime, its HTTP client,
    NumPy), with the quicker pulls and FAB installation; the entry."""
    # pylint: disable=import-outside-toplevel,unused-import
    import importlib
    import types

    import flwr.supernode

    cli = types.ModuleType("flwr.supernode.cli")  # its package imports the whole SuperNode CLI: leave it out
    cli.__path__ = [flwr.supernode.__path__[0] + "/cli"]
    sys.modules["flwr.supernode.cli"] = cli
    import httpcore  # noqa: F401  (what Flower's HTTP client imports when a process makes its first one)
    import numpy  # noqa: F401
    from flwr.app import ArrayRecord  # noqa: F401
    from flwr.clientapp import ClientApp  # noqa: F401

    prompt_pulls()
    quick_fab_install()
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One launch request: its JSON and the launcher's three standard streams."""
    conn.settimeout(10.0)
    data, fds, _, _ = socket.recv_fds(conn, 65536, STREAMS)
    if len(fds) != STREAMS:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected {STREAMS} standard streams, got {len(fds)}")
    try:
        if len(data) < HEADER.size:
            raise ValueError("request shorter than its header")
        size = HEADER.unpack_from(data)[0]
        if size > MAX_REQUEST:
            raise ValueError(f"request of {size} bytes")
        body = data[HEADER.size:]
        while len(body) < size:
            chunk = conn.recv(min(size - len(body), 2**20))
            if not chunk:
                raise ValueError("launcher hung up mid-request")
            body += chunk
        request = json.loads(body[:size])
        if not (isinstance(request, dict) and isinstance(request.get("argv"), list)
                and all(isinstance(a, str) for a in request["argv"])
                and isinstance(request.get("env"), dict) and isinstance(request.get("cwd"), str)):
            raise ValueError("request without argv, env and cwd")
    except Exception:
        for fd in fds:
            os.close(fd)
        raise
    conn.settimeout(None)
    return request, fds


def run_child(request: dict, fds: list[int], launcher_dir: str, entry: Callable[[], object]) -> None:
    """In the forked process: become the launcher's ``flwr-clientapp`` and run it; never returns."""
    code = 1
    try:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(number, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        os.environ[FORKED_ENV] = "1"
        sys.argv = list(request["argv"])
        sys.path[0] = launcher_dir  # as a fresh launcher's: its own folder first, not this file's
        import random  # pylint: disable=import-outside-toplevel

        random.seed()
        entry()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # pylint: disable=broad-exception-caught
        import traceback  # pylint: disable=import-outside-toplevel

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # pylint: disable=protected-access


class Server:
    """Accepts launch requests on a Unix socket, forks one ClientApp process per request."""

    def __init__(self, path: str, parent_pid: int, launcher_dir: str, entry: Callable[[], object]) -> None:
        self.path, self.parent_pid, self.launcher_dir, self.entry = path, parent_pid, launcher_dir, entry
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, launcher's connection)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.inode = -1

    def serve(self) -> None:
        """Until the SuperNode is gone or a SIGTERM arrives."""
        tmp = f"{self.path}.{os.getpid()}"
        self.listener.bind(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)  # atomically: a launcher never sees a half-made socket
        self.inode = os.stat(self.path).st_ino
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ)
        try:
            while os.getppid() == self.parent_pid:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.fileobj is self.listener:
                        self.accept()
                    else:
                        self.reap(key.fd)
        finally:
            self.close()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[2]
            if uid != os.getuid():
                raise PermissionError(f"launcher of uid {uid}")
            request, fds = read_request(conn)
        except (OSError, ValueError) as err:
            print(f"fork server: launch refused: {err}", file=sys.stderr, flush=True)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:  # no process to be had now: the launcher runs the plain ClientApp
            print(f"fork server: cannot fork ({err})", file=sys.stderr, flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        if pid == 0:
            self.selector.close()
            self.listener.close()
            conn.close()
            for pidfd, (_, other) in self.children.items():
                os.close(pidfd)
                other.close()
            run_child(request, fds, self.launcher_dir, self.entry)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = (pid, conn)
        self.selector.register(pidfd, selectors.EVENT_READ)
        self.reply(conn, {"pid": pid})

    def reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self.reply(conn, {"exit": os.waitstatus_to_exitcode(status)})
        conn.close()

    @staticmethod
    def reply(conn: socket.socket, message: dict) -> None:
        try:
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:  # the launcher is gone: its process runs on regardless
            pass

    def close(self) -> None:
        try:
            if os.stat(self.path).st_ino == self.inode:  # still ours, not a later server's
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()
        for pidfd, (_, conn) in self.children.items():  # running ClientApps go on; their launchers wait no more
            os.close(pidfd)
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="the ClientApp fork server of one SuperNode")
    parser.add_argument("--socket", required=True, help="Unix socket path (in a private folder)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode's PID: exit when it is gone")
    parser.add_argument("--launcher-dir", required=True, help="folder of the flwr-clientapp launcher")
    parser.add_argument("--entry", default=ENTRY, help=f"module:function a forked process runs (default {ENTRY})")
    args = parser.parse_args()
    if not hasattr(os, "pidfd_open"):
        sys.exit("fork server: needs os.pidfd_open (Linux 5.3+, Python 3.9+)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:  # SIGTERM when the SuperNode dies, however it dies
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    entry = warm_imports(args.entry)
    if os.getppid() == args.parent_pid:
        Server(args.socket, args.parent_pid, args.launcher_dir, entry).serve()


if __name__ == "__main__":
    main()
