"""Start a SuperLink and N SuperNodes on this host (TLS and authentication on), run the app, stop them.

The same steps a deployment on real machines takes, shown on one host:

1. ``deploy/make_certs.sh``: a CA and a SuperLink certificate for 127.0.0.1/localhost;
   ``deploy/make_keys.sh``: one authentication key pair per SuperNode.
2. ``flower-superlink`` with ``--ssl-*``, ``--enable-supernode-auth`` and
   ``--disable-runtime-dependency-installation``.
3. ``flwr supernode register <node>.pub cluster`` for every node.
4. ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key <node>
   --node-config "partition-id=i num-partitions=N max-layers=k ..."`` per node.
5. ``flwr run . cluster --stream``.

Everything lives in ``--workdir`` (its own ``FLWR_HOME``, credentials, logs, and
``pids.json``), every port is free, and every process started here (with the SuperExec
sessions those started) is stopped by PID, process group by process group, when the
run ends, fails, or the launcher gets SIGINT/SIGTERM.

    python deploy/local_cluster.py                               # 3 nodes holding 12, 6, 3 blocks
    python deploy/local_cluster.py --max-layers 12,8,4,3 -c "experiment='configs/default.yaml'"
"""

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path.insert(0, str(DEPLOY))

from simulate import free_port, stop, superexec_pids  # noqa: E402

CONNECTION = "cluster"
DEFAULT_EXPERIMENT = "deploy/cluster.yaml"


def tool_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's tools: this Python's bin first, own FLWR_HOME, no runtime installs."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def node_env(env: dict[str, str], num_nodes: int) -> dict[str, str]:
    """A SuperNode's environment on a shared host: its share of the cores for torch.

    On its own device a ClientApp may use every core; N nodes on one host each using
    every core oversubscribe it many times over (Flower's simulation gives each client
    one core for the same reason). ``OMP_NUM_THREADS`` set by the user wins.
    """
    threads = max(1, len(os.sched_getaffinity(0)) // max(1, num_nodes))
    return {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(threads))}


def make_credentials(workdir: Path, node_names: Sequence[str]) -> tuple[Path, Path]:
    """CA + server certificate for the loopback addresses, and a key pair per node name."""
    certs, keys = workdir / "certs", workdir / "keys"
    subprocess.run(["bash", str(DEPLOY / "make_certs.sh"), str(certs), "127.0.0.1", "localhost"],
                   check=True, capture_output=True)
    subprocess.run(["bash", str(DEPLOY / "make_keys.sh"), str(keys), *node_names], check=True, capture_output=True)
    return certs, keys


def write_connection(flwr_home: Path, address: str, ca_cert: Path, name: str = CONNECTION) -> None:
    """``config.toml`` with one TLS connection ``name`` to the SuperLink, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n')


def spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in its own session (so its children stop with it), output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def start_superlink(workdir: Path, port: int, certs: Path, env: dict[str, str]) -> subprocess.Popen:
    """``flower-superlink`` on 127.0.0.1:port, TLS and SuperNode authentication on."""
    command = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port),
               "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
               "--ssl-ca-certfile", str(certs / "ca.crt"), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation"]  # state in memory: a fresh federation per launch
    return spawn(command, workdir / "logs" / "superlink.log", env)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def register(public_key: Path, env: dict[str, str], connection: str = CONNECTION) -> None:
    """``flwr supernode register``: the SuperLink will accept the node holding the private key."""
    result = subprocess.run(["flwr", "supernode", "register", str(public_key), connection],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0 or "registered successfully" not in result.stdout:
        raise RuntimeError(f"registering {public_key} failed:\n{result.stdout}{result.stderr}")


def node_config(partition_id: int, num_partitions: int, max_layers: int | None, extra: str = "") -> str:
    """The ``--node-config`` string of one SuperNode."""
    pairs = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if max_layers is not None:
        pairs.append(f"max-layers={max_layers}")
    return " ".join(pairs + shlex.split(extra, posix=False))


def start_supernode(workdir: Path, name: str, superlink_port: int, config: str, env: dict[str, str],
                    ca_cert: Path | None, private_key: Path | None) -> subprocess.Popen:
    """``flower-supernode`` with its own free runtime port; no CA or key when given None."""
    command = ["flower-supernode", "--superlink", f"127.0.0.1:{superlink_port}", "--port", str(free_port()),
               "--node-config", config]
    if ca_cert is not None:
        command += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return spawn(command, workdir / "logs" / f"{name}.log", env)


def run_app(run_config: str, env: dict[str, str], connection: str = CONNECTION) -> int:
    """``flwr run <app> <connection> --stream``; its log goes to this process's stdout."""
    command = ["flwr", "run", str(ROOT), connection, "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    print(f"FLWR_HOME={env['FLWR_HOME']} {shlex.join(command)}", flush=True)
    return subprocess.call(command, env=env, cwd=ROOT)


def stop_processes(processes: dict[str, subprocess.Popen]) -> None:
    """Stop every process started here, and the SuperExec sessions they started, by PID.

    The SuperLink starts its ``flower-superexec`` (``--parent-pid``) in a session of
    its own, and that session runs the ServerApp: stopping the SuperLink alone would
    leave the run going. A SuperNode's runtime shares its process group.
    """
    order = [name for name in processes if name != "superlink"] + ["superlink"]
    pids = [processes[name].pid for name in order if name in processes]
    stop([child for pid in pids for child in superexec_pids(pid)] + pids)
    for process in processes.values():
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_max_layers(text: str) -> list[int | None]:
    """``"6,4,2"`` -> ``[6, 4, 2]``; ``-`` leaves a node's capacity to the experiment or its budget."""
    values: list[int | None] = []
    for item in text.split(","):
        item = item.strip()
        if item == "-":
            values.append(None)
        elif item.isdigit() and int(item) >= 1:
            values.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"--max-layers: {item!r} is not a positive integer or '-'")
    return values


def main(argv: list[str] | None = None) -> int:
    """Start the cluster, run the app against it, stop everything; return flwr's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-layers", type=parse_max_layers, default=parse_max_layers("12,6,3"),
                        help="capacity of each SuperNode, comma-separated (one node per entry)")
    parser.add_argument("--node-config", default="",
                        help="extra node-config for every node, e.g. \"backbone-cache='/x' device='cpu'\"")
    parser.add_argument("-c", "--run-config", default=f"experiment='{DEFAULT_EXPERIMENT}'",
                        help="Flower run-config overrides")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cluster",
                        help="FLWR_HOME, credentials, logs and pids.json of this cluster")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = args.workdir.resolve()
    env = tool_env(workdir / "flwr-home")
    names = [f"node-{i}" for i in range(len(args.max_layers))]
    processes: dict[str, subprocess.Popen] = {}
    try:
        certs, keys = make_credentials(workdir, names)
        port = free_port()
        write_connection(workdir / "flwr-home", f"127.0.0.1:{port}", certs / "ca.crt")
        processes["superlink"] = start_superlink(workdir, port, certs, env)
        wait_for_port(port, processes["superlink"])
        for i, (name, capacity) in enumerate(zip(names, args.max_layers)):
            register(keys / f"{name}.pub", env)
            config = node_config(i, len(names), capacity, args.node_config)
            processes[name] = start_supernode(workdir, name, port, config, node_env(env, len(names)),
                                              certs / "ca.crt", keys / name)
            print(f"{name}: --node-config \"{config}\" (log {workdir / 'logs' / name}.log)", flush=True)
        (workdir / "pids.json").write_text(json.dumps({n: p.pid for n, p in processes.items()}, indent=1))
        return run_app(args.run_config, env)
    except KeyboardInterrupt:
        print("interrupted: stopping the cluster", file=sys.stderr, flush=True)
        return 130
    finally:
        stop_processes(processes)


if __name__ == "__main__":
    sys.exit(main())
