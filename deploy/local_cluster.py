"""Start a SuperLink, a TLS proxy for its Fleet API and N SuperNodes on this host, run the app, stop them.

The same steps a deployment on real machines takes, shown on one host:

1. ``deploy/make_certs.sh``: a CA and a SuperLink certificate for 127.0.0.1/localhost;
   ``deploy/make_keys.sh``: one authentication key pair per SuperNode.
2. ``flower-superlink`` on 127.0.0.1 only, with ``--ssl-*``, ``--enable-supernode-auth``
   and ``--disable-runtime-dependency-installation``. It serves the Fleet, Control and
   Runtime APIs on that one port, the Control API without authentication.
3. nginx (``deploy/nginx/``): TLS for the SuperNodes on the proxy's port, forwarding
   the Fleet API's routes alone to the SuperLink (whose certificate it verifies) and
   refusing everything else, the Control API above all.
4. ``flwr supernode register <node>.pub cluster`` for every node (Control API, loopback).
5. ``flower-supernode --superlink <proxy> --root-certificates ca.crt
   --auth-supernode-private-key <node> --node-config "partition-id=i num-partitions=N
   max-layers=k ..."`` per node; the launcher waits until every node is online at the
   SuperLink and stops, naming the node and its log's last words, if one exits first.
   Each node trains on its own share of this host's cores, in proportion to the blocks
   it holds, as on devices of different sizes (``--no-pin-cores``: every node on every
   core); its Flower processes run wherever a core is free.
6. ``flwr run . cluster --stream``; the run's final status is read back from the
   SuperLink and printed in one line, the cause of a failure included.

Before any of it, ``fedra_core.preflight`` checks what can be checked here (the
experiment, the backbone, the data, capacities and ``--max-layers`` against depth,
``--node-config``); a problem stops the launcher with one line and exit code 2.

Everything lives in ``--workdir`` (its own ``FLWR_HOME``, credentials, the proxy's
generated configuration, logs, ``pids.json``), every port is free, and every process
started here (with the SuperExec sessions those started) is stopped by PID, process
group by process group, when the run ends, fails, or the launcher gets SIGINT, SIGTERM
or SIGHUP (the terminal closed); if the launcher itself is killed (``kill -9``), the
kernel sends each of them SIGTERM.

    python deploy/local_cluster.py                               # 3 nodes holding 12, 6, 3 blocks
    python deploy/local_cluster.py --max-layers 12,8,4,3 -c "experiment='configs/x.yaml'"

Exit codes: 0 completed, 1 the run or a SuperNode failed, 2 stopped before starting
anything, 130 interrupted.
"""

import argparse
import ctypes
import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path.insert(0, str(DEPLOY))

from simulate import (  # noqa: E402
    FLWR,
    free_port,
    ignore_signals,
    log_cause,
    one_line,
    outcome,
    say,
    stop,
    stop_on_signals,
    stream_flwr_run,
    superexec_pids,
    tail,
)

from client_app.worker import CORES_ENV  # noqa: E402
from fedra_core.config import NODE_CONFIG_KEYS  # noqa: E402
from fedra_core.preflight import PreflightError, check_run, parse_run_config  # noqa: E402

CONNECTION = "cluster"
DEFAULT_EXPERIMENT = "deploy/cluster.yaml"
NGINX_TEMPLATES = DEPLOY / "nginx"
SUPERLINK_NAME = "localhost"  # a name in the SuperLink's certificate, by which the proxy verifies it


class NodeFailed(RuntimeError):
    """A SuperNode exited, or never came online; the message names it and its log's last words."""


def tool_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's tools: this Python's bin first, own FLWR_HOME, no runtime installs."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def node_env(env: dict[str, str], threads: int, cores: Sequence[int] = ()) -> dict[str, str]:
    """A SuperNode's environment on a shared host: its share of the cores for its training.

    On its own device a ClientApp may use every core; N nodes on one host each using
    every core oversubscribe it many times over (Flower's simulation gives each client
    one core for the same reason). ``threads`` torch threads (``OMP_NUM_THREADS``; set
    by the user, it wins) and, given ``cores``, the CPUs its training runs on
    (``FEDRA_NODE_CORES``: the node's warm worker, or a ClientApp training without one,
    pins itself to them; the node's Flower processes are not pinned).
    """
    out = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(max(1, threads)))}
    if cores:
        out[CORES_ENV] = ",".join(map(str, cores))
    return out


def split_cores(cores: Sequence[int], weights: Sequence[int]) -> list[list[int]]:
    """The cores of each of the nodes sharing this host, in proportion to ``weights`` (their blocks).

    A node holding 12 blocks trains four times the work of one holding 3, and a round
    waits for the slowest node: on one host, the cores go where the work is, as they
    would on devices of different sizes. With more cores than nodes every node gets at
    least one and the rest go by largest remainder; with as many or fewer, the heaviest
    node first takes the least loaded core, and lighter nodes share one.
    """
    cores, count = sorted(cores), len(weights)
    if count == 0:
        return []
    if len(cores) <= count:
        load = [0] * len(cores)
        out: list[list[int]] = [[] for _ in weights]
        for i in sorted(range(count), key=lambda i: -weights[i]):
            least = min(range(len(cores)), key=lambda c: load[c])
            load[least] += weights[i]
            out[i] = [cores[least]]
        return out
    shares = [len(cores) * w / sum(weights) for w in weights]
    given = [1] * count
    for _ in range(len(cores) - count):
        given[max(range(count), key=lambda i: shares[i] - given[i])] += 1
    starts = [sum(given[:i]) for i in range(count)]
    return [cores[start:start + n] for start, n in zip(starts, given)]


def make_key_pair(keys: Path, name: str) -> None:
    """``keys/name`` and ``keys/name.pub``: what ``deploy/make_keys.sh`` makes with ssh-keygen
    (ECDSA P-384, OpenSSH format), made here with ``cryptography`` (a Flower dependency), so
    that a host without an OpenSSH client runs the cluster too. An existing pair is kept."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_path, public_path = keys / name, keys / f"{name}.pub"
    if private_path.exists():
        return
    keys.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public + f" {name}\n".encode())


def make_credentials(workdir: Path, node_names: Sequence[str]) -> tuple[Path, Path]:
    """CA + server certificate for the loopback addresses, and a key pair per node name."""
    certs, keys = workdir / "certs", workdir / "keys"
    subprocess.run(["bash", str(DEPLOY / "make_certs.sh"), str(certs), "127.0.0.1", SUPERLINK_NAME],
                   check=True, capture_output=True)
    for name in node_names:
        make_key_pair(keys, name)
    return certs, keys


def write_connection(flwr_home: Path, address: str, ca_cert: Path, name: str = CONNECTION) -> None:
    """``config.toml`` with one TLS connection ``name`` to the SuperLink, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n')


def _end_with_launcher() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def spawn(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``command`` in its own session (so its children stop with it), output to a log.

    The process gets SIGTERM if this launcher dies without cleaning up (``kill -9``);
    a SIGHUP for the terminal's process group does not reach it, the launcher stops it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True, preexec_fn=_end_with_launcher)


def start_superlink(workdir: Path, port: int, certs: Path, env: dict[str, str]) -> subprocess.Popen:
    """``flower-superlink`` on 127.0.0.1:port only, TLS and SuperNode authentication on."""
    command = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port),
               "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
               "--ssl-ca-certfile", str(certs / "ca.crt"), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation"]  # state in memory: a fresh federation per launch
    return spawn(command, workdir / "logs" / "superlink.log", env)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0, log: Path | None = None) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    name = Path(str(process.args[0])).name
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = f": {log_cause(tail(log))}" if log else ""
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening{said}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


# ---------------------------------------------------------------- the Fleet API proxy

def find_nginx() -> str | None:
    """The nginx binary (Debian's lies in /usr/sbin, outside an ordinary user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def render(template: Path, values: Mapping[str, object]) -> str:
    """``template`` with every ``@KEY@`` replaced; a placeholder left unfilled is an error."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    if left:
        raise ValueError(f"{template}: no value for {', '.join(left)}")
    return text


def write_proxy_config(workdir: Path, listen: str, superlink: str, certs: Path) -> Path:
    """This run's nginx configuration in ``workdir/nginx``: the Fleet API proxy, run as this user.

    ``deploy/nginx/fleet-proxy.conf`` (the part a host's nginx includes) with this run's
    addresses and certificates, inside ``deploy/nginx/standalone.conf`` (pid file, logs
    and temporary files in the workdir, so no root and no system path is needed).
    """
    folder = workdir / "nginx"
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    server = render(NGINX_TEMPLATES / "fleet-proxy.conf", {
        "LISTEN": listen, "CERTIFICATE": certs / "server.crt", "CERTIFICATE_KEY": certs / "server.key",
        "SUPERLINK": superlink, "SUPERLINK_NAME": SUPERLINK_NAME, "CA": certs / "ca.crt"})
    (folder / "fleet-proxy.conf").write_text(server)
    if os.geteuid() == 0:  # nginx started by root would run its workers as `nobody`
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    else:
        user = "# user: the one who starts nginx (the directive needs root)"
    main = render(NGINX_TEMPLATES / "standalone.conf", {
        "USER": user, "PREFIX": folder, "LOGS": workdir / "logs", "SERVER": folder / "fleet-proxy.conf"})
    (folder / "nginx.conf").write_text(main)
    return folder / "nginx.conf"


def start_proxy(workdir: Path, nginx: str, config: Path, env: dict[str, str]) -> subprocess.Popen:
    """nginx in the foreground (``daemon off``), as a child of this launcher, stopped with it by PID."""
    command = [nginx, "-p", str(config.parent), "-c", str(config), "-e", str(workdir / "logs" / "proxy-error.log"),
               "-g", "daemon off;"]
    return spawn(command, workdir / "logs" / "proxy.log", env)


# ---------------------------------------------------------------- SuperNodes

def register(public_key: Path, env: dict[str, str], connection: str = CONNECTION) -> None:
    """``flwr supernode register``: the SuperLink will accept the node holding the private key."""
    result = subprocess.run([*FLWR, "supernode", "register", str(public_key), connection],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0 or "registered successfully" not in result.stdout:
        said = log_cause((result.stdout + result.stderr).splitlines())
        raise RuntimeError(f"registering {public_key} failed: {said}")


def node_config(partition_id: int, num_partitions: int, max_layers: int | None, extra: str = "") -> str:
    """The ``--node-config`` string of one SuperNode."""
    pairs = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if max_layers is not None:
        pairs.append(f"max-layers={max_layers}")
    return " ".join(pairs + shlex.split(extra, posix=False))


def check_node_config(extra: str) -> dict[str, object]:
    """``--node-config`` as flower-supernode parses it, naming only keys a node knows; its pairs."""
    try:
        pairs = parse_run_config(extra)
    except PreflightError as err:
        raise PreflightError(str(err).replace("--run-config", "--node-config", 1)) from None
    unknown = sorted(set(pairs) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise PreflightError(f"--node-config: unknown key {unknown[0]!r}; a node knows {list(NODE_CONFIG_KEYS)}")
    return pairs


def start_supernode(workdir: Path, name: str, superlink: int | str, config: str, env: dict[str, str],
                    ca_cert: Path | None, private_key: Path | None, poll: float | None = None,
                    fork_server: bool = True) -> subprocess.Popen:
    """``flower-supernode`` with its own free runtime port; no CA or key when given None.

    ``superlink`` is the Fleet API's address (the proxy's), or a port on 127.0.0.1. With
    ``poll`` the node is ``python -m client_app.supernode`` (Flower's SuperNode, its
    polling waits capped at ``poll`` seconds, its ClientApp processes forked from a warm
    server unless not ``fork_server``); without, Flower's own command.
    """
    address = f"127.0.0.1:{superlink}" if isinstance(superlink, int) else superlink
    program = ["flower-supernode"] if poll is None else [
        sys.executable, "-m", "client_app.supernode", "--poll-interval", str(poll),
        "--fork-server" if fork_server else "--no-fork-server"]
    command = [*program, "--superlink", address, "--port", str(free_port()), "--node-config", config]
    if ca_cert is not None:
        command += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    return spawn(command, workdir / "logs" / f"{name}.log", env)


def node_failure(name: str, process: subprocess.Popen, workdir: Path) -> str:
    """One line: the node, how it ended, the informative end of its log."""
    return (f"SuperNode {name} exited with code {process.returncode}: "
            f"{log_cause(tail(workdir / 'logs' / f'{name}.log'))} (log {workdir / 'logs' / name}.log)")


def online_nodes(env: dict[str, str], connection: str = CONNECTION) -> int:
    """How many SuperNodes the SuperLink shows online (``flwr supernode list --format json``)."""
    result = subprocess.run([*FLWR, "supernode", "list", connection, "--format", "json"],
                            env=env, cwd=ROOT, capture_output=True, text=True)
    try:
        return sum(node.get("status") == "online" for node in json.loads(result.stdout)["nodes"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def wait_for_nodes(nodes: Mapping[str, subprocess.Popen], workdir: Path, env: dict[str, str],
                   timeout: float = 180.0) -> None:
    """Return once every node is online at the SuperLink; raise ``NodeFailed`` if one exits first.

    A node that cannot start (a wrong certificate or key, a ``--node-config`` it cannot
    parse, a port taken) exits within seconds, and the run would otherwise wait for it.
    """
    deadline = time.monotonic() + timeout
    while True:
        for name, process in nodes.items():
            if process.poll() is not None:
                raise NodeFailed(node_failure(name, process, workdir))
        if online_nodes(env) >= len(nodes):
            return
        if time.monotonic() > deadline:
            names = ", ".join(nodes)
            raise NodeFailed(f"not every SuperNode ({names}) came online within {timeout:.0f} s; "
                             f"their logs are in {workdir / 'logs'}")
        time.sleep(0.5)


def run_app(run_config: str, env: dict[str, str], connection: str = CONNECTION) -> tuple[int, str]:
    """``flwr run <app> <connection> --stream``, its log to this process's stdout; exit code and final line."""
    command = ["run", str(ROOT), connection, "--stream"]
    if run_config:
        command += ["--run-config", run_config]
    say(f"FLWR_HOME={env['FLWR_HOME']} flwr {shlex.join(command)}")
    return outcome(stream_flwr_run([*FLWR, *command], env), connection, env)


def stop_processes(processes: dict[str, subprocess.Popen]) -> None:
    """Stop every process started here, and the SuperExec sessions they started, by PID.

    The SuperLink starts its ``flower-superexec`` (``--parent-pid``) in a session of
    its own, and that session runs the ServerApp: stopping the SuperLink alone would
    leave the run going. A SuperNode's runtime shares its process group, nginx's
    workers their master's.
    """
    order = [name for name in processes if name != "superlink"] + ["superlink"]
    pids = [processes[name].pid for name in order if name in processes]
    stop([child for pid in pids for child in superexec_pids(pid)] + pids)
    for process in processes.values():
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


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


def preflight(args: argparse.Namespace) -> tuple[str | None, list[int]]:
    """Everything checked before a process starts; the nginx binary (None without the proxy) and the
    blocks each node holds (its ``--max-layers``, else its client's capacity in the experiment)."""
    if args.poll_interval and not 0.01 <= args.poll_interval <= 3:
        raise PreflightError(f"--poll-interval must be 0 (Flower's own waits) or 0.01..3 seconds, "
                             f"got {args.poll_interval}")
    if shutil.which("openssl") is None:
        raise PreflightError("openssl is not installed (Debian: apt-get install openssl); "
                             "it makes the cluster's TLS certificates (deploy/make_certs.sh)")
    node_config = check_node_config(args.node_config)
    experiment = check_run(ROOT, parse_run_config(args.run_config), args.max_layers, node_config)
    if len(args.max_layers) != experiment.num_clients:
        raise PreflightError(f"--max-layers starts {len(args.max_layers)} SuperNodes but the experiment has "
                             f"{experiment.num_clients} clients (clients.capacities): one node per client")
    blocks = [own if own is not None else experiment.clients.capacities[i] for i, own in enumerate(args.max_layers)]
    if not args.proxy:
        return None, blocks
    nginx = find_nginx()
    if nginx is None:
        raise PreflightError("nginx is not installed (Debian: apt-get install nginx); "
                             "--no-proxy connects the nodes to the SuperLink directly")
    return nginx, blocks


def start_cluster(workdir: Path, args: argparse.Namespace, nginx: str | None, env: dict[str, str],
                  processes: dict[str, subprocess.Popen], blocks: Sequence[int] = ()) -> dict[str, subprocess.Popen]:
    """Credentials, the SuperLink, the proxy (unless ``nginx`` is None), registered SuperNodes.

    With ``args.pin_cores`` each node trains on its share of this host's cores, in
    proportion to the ``blocks`` it holds (``split_cores``); otherwise each may use every
    core, with an equal share of them as torch threads. Every process goes into ``processes`` as soon
    as it exists (the caller stops them); returns the SuperNodes by name.
    """
    names = [f"node-{i}" for i in range(len(args.max_layers))]
    certs, keys = make_credentials(workdir, names)
    port = free_port()
    write_connection(workdir / "flwr-home", f"127.0.0.1:{port}", certs / "ca.crt")
    processes["superlink"] = start_superlink(workdir, port, certs, env)
    wait_for_port(port, processes["superlink"], log=workdir / "logs" / "superlink.log")
    fleet = f"127.0.0.1:{port}"
    if nginx is not None:
        fleet = f"127.0.0.1:{free_port()}"
        config = write_proxy_config(workdir, fleet, f"127.0.0.1:{port}", certs)
        processes["proxy"] = start_proxy(workdir, nginx, config, env)
        wait_for_port(int(fleet.rsplit(":", 1)[1]), processes["proxy"], log=workdir / "logs" / "proxy-error.log")
        say(f"Fleet API for the SuperNodes: https://{fleet} (nginx, {config}); "
            f"SuperLink (Control API) on 127.0.0.1:{port} only")
    host = sorted(os.sched_getaffinity(0))
    pinned = split_cores(host, list(blocks) or [1] * len(names)) if args.pin_cores else [None] * len(names)
    for i, (name, capacity, cores) in enumerate(zip(names, args.max_layers, pinned)):
        register(keys / f"{name}.pub", env)
        config_text = node_config(i, len(names), capacity, args.node_config)
        threads = len(cores) if cores else len(host) // len(names)
        processes[name] = start_supernode(workdir, name, fleet, config_text, node_env(env, threads, cores or ()),
                                          certs / "ca.crt", keys / name, poll=args.poll_interval or None,
                                          fork_server=args.fork_server)
        on = f", training on cores {','.join(map(str, cores))}" if cores else ""
        say(f"{name}: --node-config \"{config_text}\"{on} (log {workdir / 'logs' / name}.log)")
    (workdir / "pids.json").write_text(json.dumps({n: p.pid for n, p in processes.items()}, indent=1))
    return {name: processes[name] for name in names}


def main(argv: list[str] | None = None) -> int:
    """Check, start the cluster, run the app against it, stop everything; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-layers", type=parse_max_layers, default=parse_max_layers("12,6,3"),
                        help="capacity of each SuperNode, comma-separated (one node per entry)")
    parser.add_argument("--node-config", default="",
                        help="extra node-config for every node, e.g. \"backbone-cache='/x' device='cpu'\"")
    parser.add_argument("-c", "--run-config", default=f"experiment='{DEFAULT_EXPERIMENT}'",
                        help="Flower run-config overrides")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cluster",
                        help="FLWR_HOME, credentials, proxy configuration, logs and pids.json of this cluster")
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="SuperNodes' longest wait between polls, seconds (python -m client_app.supernode; "
                             "0: Flower's own flower-supernode, which waits 3 s when idle)")
    parser.add_argument("--no-fork-server", dest="fork_server", action="store_false",
                        help="every ClientApp a fresh process (default: forked from a server per node that has "
                             "imported Flower; client_app/forkserver.py)")
    parser.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                        help="train each SuperNode's tasks on its own share of this host's cores, in proportion to "
                             "the blocks it holds (default on; off: every node on every core)")
    parser.add_argument("--no-proxy", dest="proxy", action="store_false",
                        help="no nginx: the SuperNodes connect to the SuperLink's own port (all its APIs)")
    args = parser.parse_args(argv)
    stop_on_signals()

    try:
        nginx, blocks = preflight(args)
    except PreflightError as err:
        say(f"local_cluster.py: {one_line(str(err))}", error=True)
        return 2
    except KeyboardInterrupt:
        return 130

    workdir = args.workdir.resolve()
    env = tool_env(workdir / "flwr-home")
    processes: dict[str, subprocess.Popen] = {}
    try:
        nodes = start_cluster(workdir, args, nginx, env, processes, blocks)
        wait_for_nodes(nodes, workdir, env)
        code, line = run_app(args.run_config, env)
        gone = [node_failure(n, p, workdir) for n, p in nodes.items() if p.poll() is not None]
        if gone:
            say("SuperNodes that exited during the run: " + "; ".join(gone), error=True)
    except subprocess.CalledProcessError as err:
        code, line = 1, f"{shlex.join(map(str, err.cmd))} failed: {one_line((err.stderr or b'').decode())}"
    except RuntimeError as err:  # NodeFailed, a server that did not start, a registration refused
        code, line = 1, one_line(str(err))
    except KeyboardInterrupt:
        code, line = 130, "interrupted: stopped the cluster"
    finally:
        ignore_signals()
        stop_processes(processes)
    say(f"local_cluster.py: {line}", error=code != 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
