"""Run the app in Flower's simulation engine with its own FLWR_HOME and ports, then clean up.

``flwr run .`` against the ``:local:`` connection starts a detached
``flower-superlink --simulation`` that outlives the run and listens on fixed ports.
This launcher gives the run its own ``FLWR_HOME`` (with a connection holding one
simulated SuperNode per client of the experiment), free ports, runtime dependency
installation off, streams the log, and stops the SuperLink it caused to start and the
SuperExec session that runs the simulation, by PID, also when interrupted.

    python deploy/simulate.py                                  # the embedded default
    python deploy/simulate.py -c "experiment='configs/x.yaml' num-server-rounds=5"
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedra_core.config import load_experiment  # noqa: E402


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_connection(flwr_home: Path) -> None:
    """``config.toml`` whose default connection is the local simulation SuperLink."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')


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


def parse_run_config(text: str) -> dict[str, str]:
    """``k1=v1 k2='v 2'`` as Flower's --run-config reads it (values kept as TOML text)."""
    pairs = {}
    for item in shlex.split(text, posix=False):
        key, _, value = item.partition("=")
        pairs[key] = value
    return pairs


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run one simulation; return flwr's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--run-config", default="", help="Flower run-config overrides")
    parser.add_argument("--flwr-home", type=Path, default=ROOT / ".flwr", help="FLWR_HOME for this run")
    parser.add_argument("--num-supernodes", type=int, help="default: one per client of the experiment")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="fraction of a GPU per simulated client, e.g. 0.25 to share one GPU by 4")
    args = parser.parse_args(argv)

    run_config = parse_run_config(args.run_config)
    experiment_path = run_config.get("experiment", "'configs/default.yaml'").strip("'\"")
    path = Path(experiment_path) if Path(experiment_path).is_absolute() else ROOT / experiment_path
    num_supernodes = args.num_supernodes or load_experiment(path).num_clients

    flwr_home = args.flwr_home.resolve()
    write_connection(flwr_home)
    control_port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # flwr and flower-superlink of this environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1"}
    federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={args.cpus_per_client} "
                  f"client-resources-num-gpus={args.gpus_per_client}")
    command = ["flwr", "run", str(ROOT), "--stream", "--federation-config", federation]
    if args.run_config:
        command += ["--run-config", args.run_config]
    print(f"FLWR_HOME={flwr_home} {' '.join(shlex.quote(c) for c in command)}", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # so that `finally` stops the SuperLink on SIGTERM too
    try:
        return subprocess.call(command, env=env, cwd=ROOT)
    except KeyboardInterrupt:
        return 130
    finally:
        stop(simulation_pids(control_port))


if __name__ == "__main__":
    sys.exit(main())
