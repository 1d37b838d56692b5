"""Run the app in Flower's simulation engine with its own FLWR_HOME and ports, then clean up.

``flwr run .`` against the ``:local:`` connection starts a detached
``flower-superlink --simulation`` that outlives the run and listens on fixed ports.
This launcher first checks locally what can be checked (``fedra_core.preflight``: the
experiment, the backbone, the data and split files, capacities against depth) and stops
with one line and exit code 2 before any Flower process starts. It then gives the run
its own ``FLWR_HOME`` (with a connection holding one simulated SuperNode per client of
the experiment), free ports, runtime dependency installation off, streams the log,
reads the run's final status from the SuperLink (``flwr ls --format json``: a run whose
ServerApp raised ends ``finished:failed``, though ``flwr run`` exits 0), prints it in
one line at the end (the cause, for a failed run) and exits 0 only for a completed
run. It stops the SuperLink it caused to start and the SuperExec session that runs the
simulation, by PID, also when interrupted (SIGINT, SIGTERM, or SIGHUP: the terminal
closed).

    python deploy/simulate.py                                  # the embedded default
    python deploy/simulate.py -c "experiment='configs/x.yaml' num-server-rounds=5"

Exit codes: 0 completed, 1 the run failed, 2 stopped before starting Flower, 130 interrupted.
"""

import argparse
import collections
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedra_core.preflight import PreflightError, check_run, parse_run_config  # noqa: E402

# ---------------------------------------------------------------- shared by the launchers

# The `flwr` CLI with Flower 1.41's migration of `[tool.flwr.federations]` turned off.
# Every flwr command run in (or pointed at) this folder would otherwise move
# pyproject.toml's federation section into the launcher's throwaway FLWR_HOME and
# comment it out in the checkout, and a user's plain `flwr run .` would then find no
# six-node federation. The launchers write their own connection into their own
# FLWR_HOME, so they have nothing to migrate.
FLWR = [sys.executable, "-c",
        "import sys; import flwr.cli.config_migration as m; "
        "m._is_migratable = lambda app: (False, 'migration off in the launchers'); "
        "from flwr.cli.app import app; sys.argv[0] = 'flwr'; app()"]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STARTED = re.compile(r"Successfully started run (\d+)")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|TooSmall|Failed)): (.+)$")
_FAILED_PREFIX = re.compile(r"^(?:ServerApp|Simulation|ClientApp) failed with exception: ")


FIXED_PORTS = range(20000, 32768)  # below Linux's default ephemeral range (32768-60999)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses right now, below the ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in the range it also gives to outgoing
    connections: between this check and the server's own bind, any connection on the host
    (the nodes' polls) may take it as its source port, and the server then fails with
    "address already in use". A port below that range is never taken that way."""
    low, high = _ephemeral_range()
    candidates = [p for p in random.sample(FIXED_PORTS, 200) if not low <= p <= high]
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # every candidate taken: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux's default where unreadable)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _pids_whose_cmdline(matches: Callable[[str], bool]) -> list[int]:
    """PIDs of the processes whose command line satisfies ``matches``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if matches(cmdline):
            pids.append(int(entry.name))
    return pids


def superlink_pids(control_port: int) -> list[int]:
    """PIDs of flower-superlink processes serving the given control port."""
    return _pids_whose_cmdline(lambda c: "flower-superlink" in c and f"127.0.0.1:{control_port}" in c)


def superexec_pids(superlink_pid: int) -> list[int]:
    """The SuperExec a SuperLink started: it leads its own session (simulation process, Ray)."""
    return _pids_whose_cmdline(lambda c: "flower-superexec" in c and f"--parent-pid {superlink_pid} " in f"{c} ")


def simulation_pids(control_port: int) -> list[int]:
    """The local SuperLink and the SuperExec sessions it started (stopping it alone leaves a run going)."""
    links = superlink_pids(control_port)
    return [pid for link in links for pid in superexec_pids(link)] + links


def running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (an exited child waiting to be reaped has)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``grace`` seconds."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)  # the SuperLink leads its own session
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
            try:
                kill(pid)
            except (ProcessLookupError, PermissionError):
                pass


def ignore_signals() -> None:
    """From here on SIGINT, SIGTERM and SIGHUP must not cut the cleanup short."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupt(signum: int, frame: object) -> None:
    """The first SIGINT/SIGTERM/SIGHUP ends the run, through the launcher's cleanup."""
    ignore_signals()
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP (the terminal closed) stop the launcher through its cleanup."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def say(line: str, error: bool = False) -> None:
    """Print one line; a closed terminal (after SIGHUP) must not stop the cleanup."""
    try:
        print(line, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:
        pass


def one_line(text: str) -> str:
    """``text`` without colour codes, its whitespace (newlines included) collapsed."""
    return " ".join(_ANSI.sub("", text).split())


def log_cause(lines: Iterable[str], max_lines: int = 4) -> str:
    """The informative end of a log, in one line: its last exception or its last ERROR block.

    A Python traceback ends with ``Type: message``; Flower's own errors are an
    ``ERROR`` line followed by unprefixed explanation lines (``[SSL:
    CERTIFICATE_VERIFY_FAILED] ...``), and a Flower process that ends on an error adds
    an ``ERROR: Exit Code: N`` summary after the traceback. The last exception is the
    cause unless an ERROR block other than that summary follows it; the log's very last
    lines are often only the shutdown messages.
    """
    clean = [one_line(line) for line in lines]
    clean = [line for line in clean if line and not line.startswith("For more information")]
    exceptions = [i for i, line in enumerate(clean) if _EXCEPTION.match(line)]
    errors = [i for i, line in enumerate(clean) if line.startswith("ERROR")]
    if not errors:
        return clean[exceptions[-1]] if exceptions else clean[-1] if clean else "(empty log)"
    first = errors[-1]
    while first > 0 and first - 1 in errors:  # the whole block of consecutive ERROR lines
        first -= 1
    block = []
    for line in clean[first:]:
        if block and line.split(":")[0].strip() in ("INFO", "WARNING", "DEBUG"):
            break
        block.append(re.sub(r"^ERROR\s*:\s*", "", line))
    if exceptions and (exceptions[-1] > first or block[0].startswith("Exit Code")):
        return clean[exceptions[-1]]
    return " | ".join(block[:max_lines])


def tail(path: Path, count: int = 200) -> list[str]:
    """The last ``count`` lines of a log file (none if it does not exist)."""
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


@dataclass
class FlwrRun:
    """What ``flwr run --stream`` did: its exit code, the run it started, its output's last lines."""

    code: int
    run_id: int | None
    lines: collections.deque = field(default_factory=lambda: collections.deque(maxlen=400))


def stream_flwr_run(command: list[str], env: dict[str, str]) -> FlwrRun:
    """Run ``flwr run ... --stream``, copying its output here line by line, and note the run's ID."""
    result = FlwrRun(code=0, run_id=None)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            result.lines.append(line)
            if result.run_id is None and (match := _STARTED.search(_ANSI.sub("", line))):
                result.run_id = int(match.group(1))
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except OSError:
                pass  # the terminal is gone; keep draining the pipe
        result.code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: `flwr run` must not outlive the launcher
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return result


def run_status(connection: str, run_id: int, env: dict[str, str], wait: float = 30.0) -> tuple[str, str]:
    """``(status, details)`` of a run from ``flwr ls --run-id --format json``, once it has finished.

    ``status`` is e.g. ``finished:completed`` or ``finished:failed``; ``details`` is
    Flower's reason (for a failed ServerApp, its exception's message). Waits up to
    ``wait`` seconds for a run that is still shown as running.
    """
    deadline = time.monotonic() + wait
    while True:
        result = subprocess.run([*FLWR, "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                env=env, cwd=ROOT, capture_output=True, text=True)
        try:
            answer = json.loads(result.stdout)  # `flwr ls` exits 0 on errors too, with "success": false
            if not answer.get("success"):
                return "unknown", f"could not read the run's status: {one_line(str(answer.get('error-message')))}"
            run = answer["runs"][0]
            status, details = str(run["status"]), str(run.get("status-details") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            said = log_cause((result.stdout + result.stderr).splitlines())
            return "unknown", f"could not read the run's status: {said}"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


def failure_cause(details: str, lines: Iterable[str]) -> str:
    """One line for a failed run: Flower's details, named by the exception's type when the log shows it."""
    message = one_line(_FAILED_PREFIX.sub("", one_line(details)))
    if not message:
        return log_cause(lines)
    for line in reversed([one_line(line) for line in lines]):
        match = _EXCEPTION.match(line)
        if match and message.startswith(match.group(2)[:60]):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {message}"
    return message


def outcome(run: FlwrRun, connection: str, env: dict[str, str]) -> tuple[int, str]:
    """Exit code and final line of a launcher, from the run's status at the SuperLink."""
    if run.run_id is None:
        return run.code or 1, f"flwr run started no run: {log_cause(run.lines)}"
    status, details = run_status(connection, run.run_id, env)
    if status == "finished:completed":
        return 0, f"run {run.run_id} {status}"
    return 1, f"run {run.run_id} {status}: {failure_cause(details, run.lines)}"


# ---------------------------------------------------------------- the simulation launcher

def write_connection(flwr_home: Path) -> None:
    """``config.toml`` whose default connection is the local simulation SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')


def main(argv: list[str] | None = None) -> int:
    """Check, run one simulation, report its status in one line; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--run-config", default="", help="Flower run-config overrides")
    parser.add_argument("--flwr-home", type=Path, default=ROOT / ".flwr", help="FLWR_HOME for this run")
    parser.add_argument("--num-supernodes", type=int, help="default: one per client of the experiment")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="fraction of a GPU per simulated client, e.g. 0.25 to share one GPU by 4")
    args = parser.parse_args(argv)
    stop_on_signals()

    try:
        experiment = check_run(ROOT, parse_run_config(args.run_config))
        num_supernodes = args.num_supernodes or experiment.num_clients
        if num_supernodes < experiment.num_clients:
            raise PreflightError(f"--num-supernodes {num_supernodes}: the experiment has {experiment.num_clients} "
                                 "clients (clients.capacities), one simulated SuperNode each")
    except PreflightError as err:
        say(f"simulate.py: {one_line(str(err))}", error=True)
        return 2
    except KeyboardInterrupt:
        return 130

    flwr_home = args.flwr_home.resolve()
    write_connection(flwr_home)
    control_port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # flwr and flower-superlink of this environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={args.cpus_per_client} "
                  f"client-resources-num-gpus={args.gpus_per_client}")
    command = ["run", str(ROOT), "local", "--stream", "--federation-config", federation]
    if args.run_config:
        command += ["--run-config", args.run_config]
    say(f"FLWR_HOME={flwr_home} flwr {shlex.join(command)}")
    try:
        code, line = outcome(stream_flwr_run([*FLWR, *command], env), "local", env)
    except KeyboardInterrupt:
        code, line = 130, "interrupted: stopped the simulation"
    finally:
        ignore_signals()
        stop(simulation_pids(control_port))
    say(f"simulate.py: {line}", error=code != 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
