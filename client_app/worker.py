"""A node's warm worker: one process per SuperNode that keeps torch, timm and peft imported,
the node's data loaded and its cache open across rounds.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message, so without it
each round pays for importing torch and rebuilding the node's data. The first ClientApp
process of a node starts the worker (in the SuperNode's process group, so it stops with
the node) and does its own task itself; later ones hand their task to the worker over a
Unix socket in a private (0700) folder and return its reply. Whenever the worker is
absent, starting, busy, crashed or stale (other code), the ClientApp does the task itself:
a round never fails because of the worker. It exits after ``worker-idle-seconds`` without
a task and as soon as its SuperNode is gone. ``worker=off`` in the node-config turns it off.

    python -m client_app.worker --socket PATH --parent-pid PID   # what the ClientApp runs
"""

import argparse
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

APP_ROOT = Path(__file__).resolve().parent.parent
IDLE_SECONDS = 600.0
HEADER = struct.Struct("!Q")  # length of the JSON header that starts every message
MAX_HEADER = 64 * 2**20
CORES_ENV = "FEDRA_NODE_CORES"  # the CPUs this node's training runs on (deploy/local_cluster.py sets it)

logger = logging.getLogger(__name__)


class WorkerTaskError(RuntimeError):
    """The task failed in the worker as it would have here (e.g. a refused task): not retried."""


class ProtocolError(OSError):
    """The other side sent something that is not a worker message, or hung up mid-message."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of the code a task runs (fedra_core and client_app): a worker with other code is stale."""
    digest = hashlib.sha256()
    for package in ("fedra_core", "client_app"):
        for path in sorted((APP_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(APP_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- messages on the socket
def _send(sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, tuple[str, Any, bytes]]) -> None:
    """A JSON header naming the arrays, then their ``.npy`` bytes, in order."""
    described = [{"name": k, "dtype": d, "shape": list(s), "nbytes": len(b)} for k, (d, s, b) in arrays.items()]
    head = json.dumps({**header, "arrays": described}).encode()
    sock.sendall(HEADER.pack(len(head)) + head)
    for _, _, data in arrays.values():
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 2**20))
        if not chunk:
            raise ProtocolError("the other side hung up mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], bytes]]]:
    (size,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if size > MAX_HEADER:
        raise ProtocolError(f"a {size}-byte header is not a worker message")
    try:
        header = json.loads(_recv_exact(sock, size))
        described = header.pop("arrays")
        arrays = {a["name"]: (str(a["dtype"]), tuple(a["shape"]), _recv_exact(sock, int(a["nbytes"])))
                  for a in described}
    except (ValueError, KeyError, TypeError) as err:
        raise ProtocolError(f"malformed worker message: {err}") from err
    return header, arrays


def _encode_result(kind: str, result: Any) -> tuple[dict[str, Any], dict[str, tuple[str, Any, bytes]]]:
    import numpy as np

    if kind in ("train", "calibrate"):  # arrays and metrics
        delta, metrics = result
        arrays = {}
        for name, array in delta.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            arrays[name] = (str(array.dtype), array.shape, buffer.getvalue())
        return {"metrics": metrics}, arrays
    if kind == "query":
        return {"metrics": result[0], "node": result[1]}, {}
    return {"metrics": result}, {}


def _decode_result(kind: str, header: Mapping[str, Any], arrays: Mapping[str, tuple[str, Any, bytes]]) -> Any:
    from fedra_core.task import decode_raw

    if kind in ("train", "calibrate"):
        return decode_raw(arrays), dict(header["metrics"])
    if kind == "query":
        return dict(header["metrics"]), dict(header["node"])
    if kind == "ping":
        return {"busy": bool(header["busy"]), "pid": int(header["pid"])}
    return dict(header["metrics"])


# ---------------------------------------------------------------- the ClientApp's side
def enabled(node_config: Mapping[str, Any]) -> bool:
    """On for deployed nodes (``flwr-clientapp`` processes) unless ``worker=off``; never in simulation."""
    if str(node_config.get("worker", "on")).lower() in ("off", "false", "0", "no"):
        return False
    return Path(sys.argv[0]).name == "flwr-clientapp"


def supernode_pid() -> int | None:
    """The SuperNode process this ClientApp runs under (``flower-supernode`` or ``client_app.supernode``)."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if b"flower-supernode" in cmdline or b"client_app.supernode" in cmdline:
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent's pid
    return None


def private_dir() -> Path | None:
    """This user's folder for worker sockets, mode 0700; None when it is not safely ours."""
    folder = Path(tempfile.gettempdir()) / f"fedra-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not folder.is_dir() or folder.is_symlink():
        logger.warning("%s is not a private folder of this user: the warm worker is off", folder)
        return None
    return folder


def socket_path(parent: int, node_config: Mapping[str, Any]) -> Path | None:
    """The socket of the worker of this SuperNode (its pid and node-config name it)."""
    folder = private_dir()
    if folder is None:
        return None
    key = json.dumps({"supernode": parent, "node-config": dict(node_config)}, sort_keys=True, default=str)
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def request(path: Path, kind: str, config: Mapping[str, Any], arrays: Mapping[str, tuple[str, Any, bytes]],
            node_config: Mapping[str, Any], version: str | None = None) -> tuple[str, Any]:
    """Send one task to the worker at ``path``: (status, result); raises OSError when it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        header = {"kind": kind, "config": dict(config), "node_config": dict(node_config),
                  "version": version or code_version()}
        _send(sock, header, arrays)
        reply, result_arrays = _recv(sock)
    status = str(reply.get("status"))
    if status == "error":
        raise WorkerTaskError(str(reply.get("error")))
    return status, _decode_result(kind, reply, result_arrays) if status == "ok" else reply.get("reason")


def call(kind: str, config: Mapping[str, Any], arrays: Mapping[str, tuple[str, Any, bytes]],
         node_config: Mapping[str, Any]) -> Any | None:
    """The task's result from this node's warm worker; None when the caller must do it itself."""
    if not enabled(node_config):
        return None
    parent = supernode_pid()
    path = socket_path(parent, node_config) if parent else None
    if path is None:
        return None
    try:
        status, result = request(path, kind, config, arrays, node_config)
    except (FileNotFoundError, ConnectionRefusedError):
        start(path, parent, node_config)  # type: ignore[arg-type]
        return None
    except OSError as err:  # crashed or killed mid-task: this process does the task
        logger.warning("the warm worker failed (%s): doing the task in this process", err)
        return None
    if status == "stale":
        start(path, parent, node_config)  # type: ignore[arg-type]
    if status != "ok":
        logger.info("the warm worker is %s (%s): doing the task in this process", status, result)
        return None
    return result


def start(path: Path, parent: int, node_config: Mapping[str, Any]) -> None:
    """Start the worker of this node in the background, unless one is starting or running."""
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return  # another ClientApp of this node is starting it
    idle = float(node_config.get("worker-idle-seconds", IDLE_SECONDS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APP_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "client_app.worker", "--socket", str(path), "--parent-pid", str(parent),
               "--idle-seconds", str(idle), "--lock-fd", str(lock)]
    with open(path.with_suffix(".log"), "ab") as log:
        # Same process group as the SuperNode (no new session): stopping the node stops its worker.
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                         cwd=APP_ROOT, pass_fds=(lock,))
    os.close(lock)


def pin_training() -> None:
    """Run this process, a node's training, on the CPUs ``FEDRA_NODE_CORES`` lists (e.g. ``0`` or ``2,3``).

    The local cluster gives each node on a shared host its share of the cores (in
    proportion to the blocks it holds); only the training is pinned, so the node's
    Flower processes (SuperNode, SuperExec, ClientApps) run on whichever core is free. Not
    set: nothing changes; a list this process cannot use is reported and ignored."""
    text = os.environ.get(CORES_ENV, "").strip()
    if not text:
        return
    try:
        os.sched_setaffinity(0, {int(core) for core in text.split(",")})
    except (ValueError, OSError) as err:
        logger.warning("%s=%r ignored: %s", CORES_ENV, text, err)


# ---------------------------------------------------------------- the worker's side
class Worker:
    """Serves one task at a time on a Unix socket until idle or orphaned."""

    def __init__(self, path: Path, parent_pid: int, idle_seconds: float, lock_fd: int | None = None) -> None:
        self.path, self.parent_pid, self.idle_seconds = path, parent_pid, idle_seconds
        self.lock_fd = lock_fd  # held by whoever started us until the socket accepts connections
        self.version = code_version()
        self.busy = threading.Lock()
        self.last_task = time.monotonic()
        self.stopping = threading.Event()

    def serve(self) -> None:
        """Accept connections until the SuperNode is gone, the idle time passes or the code is stale."""
        self.path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(self.path))
            os.chmod(self.path, 0o600)
            server.listen(8)
            server.settimeout(0.5)
            if self.lock_fd is not None:
                os.close(self.lock_fd)
            logger.info("worker %d serving %s for SuperNode %d", os.getpid(), self.path, self.parent_pid)
            try:
                while not self._should_stop():
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        continue
                    threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
            finally:
                self.path.unlink(missing_ok=True)
                if not _alive(self.parent_pid):  # no ClientApp of that SuperNode will use these names again
                    for leftover in (self.path.with_suffix(".lock"), self.path.with_suffix(".log")):
                        leftover.unlink(missing_ok=True)
        logger.info("worker %d stopped", os.getpid())

    def _should_stop(self) -> bool:
        if self.stopping.is_set() or not _alive(self.parent_pid):
            return True
        return not self.busy.locked() and time.monotonic() - self.last_task > self.idle_seconds

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if not _same_user(conn):
                    return
                header, arrays = _recv(conn)
                _send(conn, *self._answer(header, arrays))
            except OSError as err:
                logger.warning("a connection failed: %s", err)

    def _answer(self, header: dict[str, Any], arrays: dict) -> tuple[dict[str, Any], dict]:
        if header.get("version") != self.version:
            self.stopping.set()  # the ClientApp starts a worker with its own code
            return {"status": "stale", "reason": f"worker code {self.version}, task code {header.get('version')}"}, {}
        if header.get("kind") == "ping":  # is it up, and busy? (takes no task)
            return {"status": "ok", "busy": self.busy.locked(), "pid": os.getpid()}, {}
        if not self.busy.acquire(blocking=False):
            return {"status": "busy", "reason": "another task is running"}, {}
        try:
            kind = str(header.get("kind"))
            result = _run(kind, header.get("config") or {}, arrays, header.get("node_config") or {})
            reply, out = _encode_result(kind, result)
            return {"status": "ok", **reply}, out
        except Exception as err:  # the task's own failure: the ClientApp reports it as its own
            return {"status": "error", "error": f"{type(err).__name__}: {err}"}, {}
        finally:
            self.last_task = time.monotonic()
            self.busy.release()


def _run(kind: str, config: Mapping[str, Any], arrays: Mapping, node_config: Mapping[str, Any]) -> Any:
    from fedra_core import task

    if kind == "query":
        return task.run_query(config, node_config)
    if kind == "train":
        return task.run_train(config, arrays, node_config)
    if kind == "evaluate":
        return task.run_evaluate(config, arrays, node_config)
    if kind == "calibrate":
        return task.run_calibrate(config, arrays, node_config)
    raise ValueError(f"unknown task kind {kind!r}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _same_user(conn: socket.socket) -> bool:
    """Only processes of this user may hand the worker a task (the folder is 0700 too)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def main(argv: list[str] | None = None) -> int:
    """Run a node's worker (normally started by the node's first ClientApp process)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process (the SuperNode) is gone")
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS, help="exit after this long without a task")
    parser.add_argument("--lock-fd", type=int, help="start lock held until the socket is served")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pin_training()
    from fedra_core import task  # noqa: F401 - torch, timm and peft imported once, before the first task
    import fedra_core.local  # noqa: F401
    Worker(args.socket, args.parent_pid, args.idle_seconds, args.lock_fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
