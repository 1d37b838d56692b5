"""``flower-supernode`` with short polling waits and ClientApp processes forked from a warm
server, for deployments where a round is seconds long.

Flower 1.41's SuperNode waits 3 s between asks for new messages when it is idle and 0.5 s
between looks for a finished reply; its SuperExec waits 1 s between asks for a task to
launch. In a round of a few seconds these fixed waits add 1.5-4.5 s on average per message.
This command runs Flower's own SuperNode unchanged except for those waits (asks to the
SuperLink capped at ``--poll-interval`` seconds, default 0.2; looks into its own state at
0.02 s; its SuperExec's asks at 0.1 s), and for the ``flwr-clientapp`` command its
SuperExec starts for every message. The command found first on the SuperExec's PATH,
written into this user's private folder, hands the launch to this node's fork server
(``client_app/forkserver.py``): a process that has imported Flower's ClientApp runtime
once forks one that runs it, so a message no longer pays for starting Python and
importing Flower (1.7 s on a 2-core machine). Until the server listens, or with
``--no-fork-server``, it runs a lean launcher instead, which skips the SuperNode's own
command-line package (its web server and database layers). Every other argument goes
to ``flower-supernode`` as given:

    python -m client_app.supernode --poll-interval 0.2 --superlink HOST:9092 ...

The cost is more idle requests to the SuperLink (one per node every ``--poll-interval``
seconds instead of every 3 s): right for a handful of nodes, not for thousands. The waits
are found in Flower's module; if a Flower version no longer has them the command says so
and runs Flower's SuperNode with its own waits.
"""

import argparse
import hashlib
import inspect
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client_app import forkserver

FORKSERVER = Path(forkserver.__file__).resolve()  # run by path: the server must not import the app's packages

logger = logging.getLogger("fedra.supernode")

SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting for the SuperExec's wait
SUPEREXEC_POLL = 0.1  # its asks go to this node's own runtime API, on this host
DEFAULT_POLL = 0.2


LOCAL_WAIT = 0.02  # the SuperNode's looks into its own state (a reply ready?): in memory, cheap
NODE_PULL_WAIT = 0.05  # its first wait for a task's part the ServerApp has not pushed yet (Flower's: 1 s)


class ShortWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every sleep capped.

    Its waits of a second or more are between asks to the SuperLink (capped at ``cap``);
    the shorter ones (0.5 s) between looks into the node's own state for a ClientApp's
    reply (capped at ``LOCAL_WAIT``)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap if seconds >= 1.0 else min(self.cap, LOCAL_WAIT)))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_waits(cap: float) -> bool:
    """Cap the SuperNode's polling sleeps (and its SuperExec's) at ``cap`` s; False if Flower's layout differs."""
    if not 0.01 <= cap <= 3.0:
        raise ValueError(f"--poll-interval must be between 0.01 and 3 seconds, got {cap}")
    from flwr.supernode import start_client_internal as internal  # pylint: disable=import-outside-toplevel

    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(min(cap, SUPEREXEC_POLL)))  # inherited by the SuperExec
    if getattr(internal, "time", None) is not time:
        logger.warning("this Flower version's SuperNode has no module-level waits to shorten; "
                       "running it with its own (3 s idle poll)")
        return False
    internal.time = ShortWaits(cap)
    return True


LAUNCHER = """#!{python}
# flwr-clientapp without the SuperNode's command-line package (written by client_app.supernode).
import sys
import types

{prompt_pulls}

try:
    import flwr.supernode
    cli = types.ModuleType("flwr.supernode.cli")
    cli.__path__ = [flwr.supernode.__path__[0] + "/cli"]
    sys.modules["flwr.supernode.cli"] = cli
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
except ImportError:
    sys.modules.pop("flwr.supernode.cli", None)
    from flwr.supernode.cli import flwr_clientapp
try:
    prompt_pulls()
except (ImportError, AttributeError):
    pass
sys.exit(flwr_clientapp())
"""


def lean_launcher() -> str:
    """The text of the lean ``flwr-clientapp`` for this Python."""
    return LAUNCHER.format(python=sys.executable, prompt_pulls=inspect.getsource(forkserver.prompt_pulls))


def write_launcher(path: Path, text: str) -> Path:
    """Write an executable launcher (atomically, mode 0700) unless it already reads ``text``; its path."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        tmp = path.parent / f".{path.name}.{os.getpid()}"
        tmp.write_text(text)
        tmp.chmod(0o700)
        os.replace(tmp, path)
    return path


def launchers_dir() -> Path | None:
    """This Python's launcher folder in the user's private folder (None when there is none safe)."""
    from client_app.worker import private_dir  # pylint: disable=import-outside-toplevel

    folder = private_dir()
    if folder is None:
        return None
    return folder / f"bin-{hashlib.sha256(sys.executable.encode()).hexdigest()[:12]}"


def start_fork_server(folder: Path, lean: Path) -> subprocess.Popen | None:
    """Start this SuperNode's ClientApp fork server; the launcher that uses it, first on the SuperExec's PATH.

    The server imports Flower (a second or so) while the SuperNode connects; until it listens,
    the launcher runs ``lean`` as a fresh process. None where forking cannot be used."""
    if not hasattr(os, "pidfd_open") or not hasattr(socket, "send_fds"):
        logger.warning("no os.pidfd_open / socket.send_fds here: every ClientApp starts a fresh process")
        return None
    path = folder.parent / f"forkserver-{os.getpid()}.sock"
    server = subprocess.Popen([sys.executable, str(FORKSERVER), "--socket", str(path), "--parent-pid",
                               str(os.getpid()), "--launcher-dir", str(folder)], stdin=subprocess.DEVNULL)
    os.environ[forkserver.SOCKET_ENV] = str(path)
    write_launcher(folder / "flwr-clientapp", forkserver.LAUNCHER.format(
        python=sys.executable, fallback=str(lean), env=forkserver.SOCKET_ENV))
    return server


def use_fast_clientapp(fork_server: bool = True) -> Path | None:
    """Put a faster ``flwr-clientapp`` first on the PATH the SuperExec inherits: forked from a warm
    server when ``fork_server``, else the lean one. The folder put first; None when no private folder is safe."""
    folder = launchers_dir()
    if folder is None:
        return None
    lean = write_launcher(folder / "lean" / "flwr-clientapp", lean_launcher())
    bin_dir = lean.parent
    if fork_server and start_fork_server(folder, lean) is not None:
        bin_dir = folder
    os.environ["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    return bin_dir


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval``, shorten the waits, hand the rest of the arguments to Flower."""
    parser = argparse.ArgumentParser(
        prog="python -m client_app.supernode", add_help=False,
        description="flower-supernode with polling waits capped (every other argument is flower-supernode's)")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL,
                        help=f"longest wait between polls, seconds (default {DEFAULT_POLL}; Flower's idle wait is 3)")
    parser.add_argument("--fork-server", action=argparse.BooleanOptionalAction, default=True,
                        help="fork every ClientApp process from a server that has imported Flower (default on)")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        shorten_waits(known.poll_interval)
    except ValueError as err:
        parser.error(str(err))
    use_fast_clientapp(known.fork_server)
    forkserver.prompt_pulls(initial=NODE_PULL_WAIT, cap=1.0)  # this node's pulls of a task's parts from the SuperLink
    from flwr.supernode.cli.flower_supernode import flower_supernode  # pylint: disable=import-outside-toplevel

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
