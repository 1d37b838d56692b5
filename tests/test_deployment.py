"""Deployment: a SuperLink, its Fleet API proxy and SuperNodes on loopback (TLS, authentication), faults.

Resume after a stop: tests/test_resume.py.
"""

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedra_core.config import experiment_from_dict
from server_app.strategy import FedRA, NodeInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy"))

import local_cluster  # noqa: E402
from launched import leftovers, processes_with_flwr_home, stop_launcher  # noqa: E402
from launched import DOMAINS  # noqa: E402
from launched import complete_records as _records  # noqa: E402
from launched import tiny_experiment as _experiment  # noqa: E402
from launched import wait_until as _wait  # noqa: E402
from simulate import running  # noqa: E402

CAPACITIES = [5, 3, 1]  # declared by the nodes; the experiment's own capacities differ on purpose


class Cluster:
    """A SuperLink with TLS and authentication, plus SuperNodes, all stopped by PID in ``stop``."""

    def __init__(self, workdir: Path, node_names: list[str]) -> None:
        self.workdir = workdir
        self.env = local_cluster.tool_env(workdir / "flwr-home")
        self.processes: dict[str, subprocess.Popen] = {}
        self.certs, self.keys = local_cluster.make_credentials(workdir, node_names)
        self.port = local_cluster.free_port()
        local_cluster.write_connection(workdir / "flwr-home", f"127.0.0.1:{self.port}", self.certs / "ca.crt")
        self.processes["superlink"] = local_cluster.start_superlink(workdir, self.port, self.certs, self.env)
        local_cluster.wait_for_port(self.port, self.processes["superlink"])

    def register(self, name: str) -> None:
        local_cluster.register(self.keys / f"{name}.pub", self.env)

    def start_node(self, name: str, config: str, ca: bool = True, key: str | None = None) -> subprocess.Popen:
        process = local_cluster.start_supernode(self.workdir, name, self.port, config,
                                                local_cluster.node_env(self.env, 1),
                                                self.certs / "ca.crt" if ca else None, self.keys / (key or name))
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.workdir / "logs" / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        """Kill a node and everything it started (its ClientApp runtime), as a crash would."""
        process = self.processes[name]  # stays listed for teardown until it is gone
        for pid in [process.pid] + local_cluster.superexec_pids(process.pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # a process group of its own...
            except ProcessLookupError:
                try:
                    os.kill(pid, signal.SIGKILL)  # ...or already gone with the node's group
                except ProcessLookupError:
                    pass
        process.wait(timeout=10)
        del self.processes[name]

    def stop(self) -> None:
        local_cluster.stop_processes(self.processes)


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], Cluster]]:
    clusters: list[Cluster] = []

    def make(node_names: list[str]) -> Cluster:
        clusters.append(Cluster(tmp_path / f"cluster-{len(clusters)}", node_names))
        return clusters[-1]

    yield make
    for cluster in clusters:
        cluster.stop()


# --------------------------------------------------------------------------- end to end
LAUNCHER = str(ROOT / "deploy" / "local_cluster.py")


def _https_status(port: int, path: str, ca: Path, method: str = "POST") -> int:
    """Status of a bare request (empty protobuf body) to 127.0.0.1:port over TLS."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=60,
                                             context=ssl.create_default_context(cafile=str(ca)))
    try:
        connection.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def _option(pid: int, name: str) -> str:
    """The value of ``--name`` on a running process's command line (empty for a moment after exec)."""

    def args() -> list[str]:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")

    _wait(lambda: name in args(), 30, f"{name} on the command line of process {pid}")
    return args()[args().index(name) + 1]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or being written


def _worker_pids(node_pids: list[int]) -> list[int]:
    """The warm workers (client_app.worker) whose --parent-pid is one of these SuperNodes."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"client_app.worker" in args and any(args[i + 1] == str(p).encode() for p in node_pids
                                                   for i, a in enumerate(args[:-1]) if a == b"--parent-pid"):
            pids.append(int(entry.name))
    return pids


@dataclass
class DeployedRun:
    """One local_cluster.py run (3 rounds, nodes declaring 5, 3 and 1 blocks), shared by the tests below."""

    tmp_path: Path
    workdir: Path
    run_dir: Path
    pids: dict[str, int]
    code: int
    public_api: dict  # what the public (proxy) and the SuperLink's own port answered while the cluster ran
    killed_workers: list[int]

    def log(self) -> str:
        return (self.tmp_path / "launcher.log").read_text()


def _probe_ports(pids: dict[str, int], workdir: Path, outsider: Path, answers: dict) -> None:
    """While the run goes on: options the processes run with, what each port answers (in ``answers``)."""
    try:
        ca = workdir / "certs" / "ca.crt"
        answers["superlink-port"] = superlink = int(_option(pids["superlink"], "--port"))
        proxy_config = (workdir / "nginx" / "fleet-proxy.conf").read_text()
        answers["public-port"] = public = int(re.search(r"listen 127\.0\.0\.1:(\d+) ssl;", proxy_config)[1])
        answers["superlink-host"] = _option(pids["superlink"], "--host")
        answers["node-superlinks"] = {_option(pids[f"node-{i}"], "--superlink") for i in range(3)}
        answers["superlink-list-runs"] = _https_status(superlink, "/v1/control/list-runs", ca)
        answers["public"] = {path: _https_status(public, path, ca)
                             for path in ("/v1/control/list-runs", "/v1/control/start-run",
                                          "/v1/control/register-node", "/v1/runtime/get-nodes",
                                          "/flwr.proto.Control/ListRuns", "/docs")}
        answers["public-get-pull-messages"] = _https_status(public, "/v1/fleet/pull-messages", ca, method="GET")
        local_cluster.write_connection(outsider, f"127.0.0.1:{public}", ca, name="public")
        answers["flwr-ls"] = subprocess.run([*local_cluster.FLWR, "ls", "public", "--format", "json"],
                                            env=local_cluster.tool_env(outsider), capture_output=True, text=True,
                                            timeout=900).stdout  # a guard against a hang, not a time limit
    except BaseException as err:  # noqa: BLE001 - the test that reads ``answers`` raises it
        answers["error"] = err


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory: pytest.TempPathFactory, tiny_vit_cache: Path) -> Iterator[DeployedRun]:
    """local_cluster.py with its proxy: the public API probed while it runs, the warm workers killed after round 2."""
    tmp_path = tmp_path_factory.mktemp("deployed")
    experiment = _experiment(tmp_path, tiny_vit_cache, rounds=3)
    workdir, run_dir = tmp_path / "cluster", tmp_path / "out" / "tiny"
    command = [sys.executable, LAUNCHER, "--workdir", str(workdir), "--max-layers", ",".join(map(str, CAPACITIES)),
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    with open(tmp_path / "launcher.log", "wb") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    start_new_session=True)
    answers: dict = {}
    killed: list[int] = []
    try:
        _wait(lambda: _read_json(workdir / "pids.json") is not None or launcher.poll() is not None, 600,
              "the cluster to start")
        assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-4000:]
        pids = _read_json(workdir / "pids.json")
        probe = threading.Thread(target=_probe_ports, args=(pids, workdir, tmp_path / "outsider", answers),
                                 daemon=True)
        probe.start()
        _wait(lambda: len(_records(run_dir)) >= 3 or launcher.poll() is not None, 900, "round 2", interval=0.1)
        nodes = [pid for name, pid in pids.items() if name.startswith("node")]
        killed = _worker_pids(nodes)
        for pid in killed:  # round 3 is being trained: its ClientApps find no worker, or lose it
            os.kill(pid, signal.SIGKILL)
        probe.join()
        code = launcher.wait(timeout=900)
    finally:
        stop_launcher(launcher)
    yield DeployedRun(tmp_path, workdir, run_dir, pids, code, answers, killed)


def test_local_cluster_trains_through_the_proxy_which_refuses_the_control_api(deployed_run: DeployedRun) -> None:
    run, answers = deployed_run, deployed_run.public_api
    if "error" in answers:
        raise answers["error"]
    # The SuperLink listens on loopback only; every node reaches it through the proxy.
    assert answers["superlink-host"] == "127.0.0.1"
    assert answers["node-superlinks"] == {f"127.0.0.1:{answers['public-port']}"}
    # The Control API answers on the SuperLink's own port, and is refused at the public address.
    assert answers["superlink-list-runs"] == 200
    for path, status in answers["public"].items():
        assert status == 403, path
    assert len(answers["public"]) == 6
    assert answers["public-get-pull-messages"] == 403  # POST only
    answer = json.loads(answers["flwr-ls"])  # `flwr ls` by an outsider holding the CA certificate, as every device does
    assert answer["success"] is False and "403 Forbidden" in answer["error-message"], answers["flwr-ls"]

    log = run.log()
    assert run.code == 0, log[-4000:]
    assert re.search(r"local_cluster.py: run \d+ finished:completed\s*$", log), log[-2000:]
    records = _records(run.run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3], log[-4000:]
    for record in records[1:]:
        declared = {row["partition_id"]: row["capacity"] for row in record["rows"]}
        held = {row["partition_id"]: sum(a) for row, a in zip(record["rows"], record["allocation"])}
        assert declared == held == dict(enumerate(CAPACITIES))
        assert all(c["status"] == "ok" and c["bytes_received"] > 0 for c in record["clients"])
    assert (run.run_dir / "adapters.safetensors").is_file()
    assert "Uvicorn running on https://127.0.0.1:" in (run.workdir / "logs" / "superlink.log").read_text()
    access = (run.workdir / "logs" / "proxy-access.log").read_text()
    assert re.search(r'"POST /v1/fleet/push-messages HTTP/1.1" 200 .*python-httpx', access)  # the nodes' replies
    assert re.search(r'"POST /v1/control/list-runs HTTP/1.1" 403 .*python-httpx', access)  # flwr ls, refused
    assert set(run.pids) == {"superlink", "proxy", "node-0", "node-1", "node-2"}
    assert leftovers(list(run.pids.values()), run.workdir / "flwr-home") == []  # nginx's workers included


def test_deployed_rounds_use_the_worker_and_survive_its_death(deployed_run: DeployedRun) -> None:
    """The nodes' warm workers serve round 2; killed during round 3, no round fails because of it."""
    run = deployed_run
    assert run.code == 0, run.log()[-4000:]
    done = _records(run.run_dir)
    assert [r["round"] for r in done] == [0, 1, 2, 3]
    assert all(c["status"] == "ok" for r in done[1:] for c in r["clients"])
    assert len(run.killed_workers) == 3
    served = [c["metrics"].get("worker", 0) for c in done[2]["clients"]]
    assert served == [1, 1, 1]  # round 2: every node's worker was warm
    forked = [c["metrics"].get("forked") for c in done[2]["clients"]]
    assert forked == [1, 1, 1]  # and every ClientApp process came from its node's fork server
    nodes = [pid for name, pid in run.pids.items() if name.startswith("node")]
    _wait(lambda: not _worker_pids(nodes), 60, "the workers to exit with their SuperNodes")


def test_local_cluster_stops_everything_on_sighup(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache, rounds=50)
    workdir = tmp_path / "cluster"
    command = [sys.executable, LAUNCHER, "--workdir", str(workdir),
               "--max-layers", "2,1,1", "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                                start_new_session=True)
    try:
        _wait(lambda: (tmp_path / "out" / "tiny").is_dir(), 600, "the ServerApp to start")
        pids = list(json.loads((workdir / "pids.json").read_text()).values())
        runtimes = [child for pid in pids for child in local_cluster.superexec_pids(pid)]
        assert runtimes and processes_with_flwr_home(workdir / "flwr-home")

        os.killpg(launcher.pid, signal.SIGHUP)  # the terminal closed: its whole process group gets SIGHUP

        assert launcher.wait(timeout=120) == 130
    finally:
        stop_launcher(launcher)
    assert not any(running(pid) for pid in pids + runtimes)
    assert leftovers(pids + runtimes, workdir / "flwr-home") == []


def test_local_cluster_names_a_supernode_that_cannot_start(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _experiment(tmp_path, tiny_vit_cache)
    workdir = tmp_path / "cluster"
    keys = workdir / "keys"  # node-1's private key does not belong to the public key that gets registered
    local_cluster.make_credentials(tmp_path / "other", ["node-1"])
    local_cluster.make_credentials(workdir, ["node-1"])
    shutil.copy(tmp_path / "other" / "keys" / "node-1", keys / "node-1")
    command = [sys.executable, LAUNCHER, "--workdir", str(workdir), "--max-layers", "2,1,1", "--no-proxy",
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]

    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("local_cluster.py: SuperNode node-1 exited with code ")
    assert "Failed to activate SuperNode" in last and str(workdir / "logs" / "node-1.log") in last
    assert not (tmp_path / "out").exists()  # no run was started
    pids = list(json.loads((workdir / "pids.json").read_text()).values())
    assert leftovers(pids, workdir / "flwr-home") == []


def test_unregistered_node_and_node_without_the_ca_are_refused(cluster_factory: Callable) -> None:
    cluster = cluster_factory(["member", "stranger"])
    cluster.register("member")
    member = cluster.start_node("member", "partition-id=0")
    stranger = cluster.start_node("stranger", "partition-id=1")
    no_ca = cluster.start_node("no-ca", "partition-id=2", ca=False, key="member")

    _wait(lambda: stranger.poll() is not None and no_ca.poll() is not None, 120, "the refused nodes to exit")

    assert stranger.returncode != 0 and "Failed to activate SuperNode" in cluster.log("stranger")
    assert no_ca.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in cluster.log("no-ca")
    _wait(lambda: "SuperNode ID" in cluster.log("member"), 60, "the registered node to join")
    assert member.poll() is None
    # What the launcher says of each: one line naming the node and the cause from its log.
    for name, process, cause in (("stranger", stranger, "Failed to activate SuperNode"),
                                 ("no-ca", no_ca, "CERTIFICATE_VERIFY_FAILED")):
        line = local_cluster.node_failure(name, process, cluster.workdir)
        assert line.startswith(f"SuperNode {name} exited with code ") and cause in line and "\n" not in line, line
    with pytest.raises(local_cluster.NodeFailed, match="SuperNode stranger exited"):
        local_cluster.wait_for_nodes({"member": member, "stranger": stranger}, cluster.workdir, cluster.env)


def test_flwr_without_the_ca_is_refused(cluster_factory: Callable) -> None:
    cluster = cluster_factory(["member"])
    config = cluster.workdir / "flwr-home" / "config.toml"
    with_ca = config.read_text()
    config.write_text(with_ca.replace("root-certificates", "# root-certificates"))

    result = subprocess.run([*local_cluster.FLWR, "supernode", "register", str(cluster.keys / "member.pub"), "cluster"],
                            env=cluster.env, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0 and "registered successfully" not in result.stdout
    assert "Connection to the SuperLink is unavailable" in result.stdout + result.stderr
    config.write_text(with_ca)
    cluster.register("member")  # the same command with the CA goes through


# ----------------------------------------------------------------------------- faults
def test_killed_supernode_fails_its_round_and_rejoins(cluster_factory: Callable, tmp_path: Path,
                                                      tiny_vit_cache: Path) -> None:
    names = [f"node-{i}" for i in range(3)]
    cluster = cluster_factory(names)
    configs = {n: local_cluster.node_config(i, 3, CAPACITIES[i]) for i, n in enumerate(names)}
    for name in names:
        cluster.register(name)
        cluster.start_node(name, configs[name])
    # Five rounds: the restarted node needs a few seconds to reconnect, and replies are collected as they
    # arrive (PromptGrid), so rounds 2-3 alone can end before it is back.
    experiment = _experiment(tmp_path, tiny_vit_cache, rounds=5, reply_timeout=60, min_clients=2)
    run_dir = tmp_path / "out" / "tiny"
    command = [*local_cluster.FLWR, "run", str(ROOT), "cluster", "--stream", "--run-config",
               f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    with open(tmp_path / "run.log", "wb") as log:
        cluster.processes["flwr-run"] = subprocess.Popen(command, env=cluster.env, stdout=log,
                                                         stderr=subprocess.STDOUT, start_new_session=True)

    _wait(lambda: len(_records(run_dir)) >= 1, 600, "round 0")  # round 1 is being sent now
    cluster.kill("node-2")
    _wait(lambda: len(_records(run_dir)) >= 2, 600, "round 1")
    cluster.start_node("node-2", configs["node-2"])  # same key: the same node comes back
    cluster.processes["flwr-run"].wait(timeout=900)

    records = _records(run_dir)
    run_log = (tmp_path / "run.log").read_text()
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4, 5], run_log[-4000:]
    first = records[1]
    failed = [f for f in first["failures"] if f["partition_id"] == 2]
    assert len(failed) == 1 and failed[0]["reason"], first["failures"]
    held = {row["partition_id"]: a for row, a in zip(first["rows"], first["allocation"])}
    survivors = np.array([held[0], held[1]]).sum(axis=0)
    assert first["blocks_trained"] == survivors.tolist()  # nothing from the dead node
    assert {c["partition_id"]: c["status"] for c in first["clients"]} == {0: "ok", 1: "ok", 2: "failed"}
    back = [c for r in records[2:] for c in r["clients"] if c["partition_id"] == 2 and c["status"] == "ok"]
    assert back, "the restarted node was never sampled again"
    assert (run_dir / "adapters.safetensors").is_file()


class _QueryGrid:
    """Answers the capacity query with canned replies (no transport)."""

    def __init__(self, answers: dict[int, Callable[[Message], Message]]) -> None:
        self.answers = answers

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        return [self.answers[m.metadata.dst_node_id](m) for m in messages]


@pytest.fixture
def run_identity() -> Iterator[None]:
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # stamped on messages
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


def test_node_declaring_no_valid_capacity_is_excluded_with_its_reason(run_identity: None) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [4, 4, 4]}})
    strategy = FedRA(experiment, 4, np.random.default_rng(0))

    def declare(max_layers: object) -> Callable[[Message], Message]:
        def answer(message: Message) -> Message:
            content = RecordDict({"capacity": MetricRecord({"max-layers": max_layers, "partition-id": 0,
                                                            "num-examples": 10}),
                                  "node": ConfigRecord({"domain": "clean"})})
            return Message(content, reply_to=message)
        return answer

    def crash(message: Message) -> Message:
        return Message(Error(code=0, reason="ConfigError: node-config: memory-budget-mb=0.001 cannot hold one block"),
                       reply_to=message)

    grid = _QueryGrid({1: declare(3), 2: declare(0), 3: crash})

    strategy.discover(grid, wait_for=1)  # type: ignore[arg-type]

    assert list(strategy.nodes) == [1] and strategy.nodes[1].max_layers == 3
    assert "declared max-layers 0 is not a whole number in 1.." in strategy.excluded[2]
    assert "memory-budget-mb=0.001 cannot hold one block" in strategy.excluded[3]


def test_node_whose_cache_holds_other_weights_is_excluded(run_identity: None) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [4, 4, 4, 4]}})
    strategy = FedRA(experiment, 4, np.random.default_rng(0), backbone_source="builtin:digits-vit:recipe=new")

    def declare(partition: int, source: str, layers: int = 4) -> Callable[[Message], Message]:
        def answer(message: Message) -> Message:
            capacity = MetricRecord({"max-layers": 4, "partition-id": partition, "backbone-layers": layers,
                                     "num-examples": 10})
            content = RecordDict({"capacity": capacity,
                                  "node": ConfigRecord({"domain": "clean", "backbone-source": source})})
            return Message(content, reply_to=message)
        return answer

    grid = _QueryGrid({1: declare(0, "builtin:digits-vit:recipe=new"), 2: declare(1, "builtin:digits-vit:recipe=old"),
                       3: declare(2, "builtin:digits-vit:recipe=new", layers=6), 4: declare(3, "")})

    strategy.discover(grid, wait_for=2)  # type: ignore[arg-type]

    assert sorted(strategy.nodes) == [1, 4]  # same weights, or a cache that records no source
    assert "other weights (builtin:digits-vit:recipe=old)" in strategy.excluded[2]
    assert "has 6 blocks, the server's 4" in strategy.excluded[3]


def test_run_stops_with_a_message_when_fewer_than_min_clients_remain(run_identity: None) -> None:
    experiment = experiment_from_dict({"clients": {"capacities": [4, 4, 4]}, "strategy": {"min_clients": 2}})
    strategy = FedRA(experiment, 4, np.random.default_rng(0))
    strategy.nodes = {n: NodeInfo(n, i, 4, DOMAINS[i], 10) for i, n in enumerate([1, 2, 3])}
    grid = _QueryGrid({1: lambda m: m})  # nodes 2 and 3 are gone
    state = ArrayRecord({"head.weight": torch.zeros(2, 2)})

    with pytest.raises(RuntimeError, match="only 1 clients are available, fewer than strategy.min_clients = 2"):
        strategy.configure_train(1, state, ConfigRecord(), grid)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- compose
def test_compose_file_validates() -> None:
    validator = shutil.which("docker-compose")
    assert validator, "docker-compose (v1) is needed to validate deploy/compose.yml: apt-get install docker-compose"

    result = subprocess.run([validator, "-f", str(ROOT / "deploy" / "compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=ROOT / "deploy", timeout=120)

    assert result.returncode == 0, result.stderr


def test_credentials_need_no_openssh_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's SuperNode keys come from Python: a host without ssh-keygen (a GPU image) runs it."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    tools = tmp_path / "bin"  # what make_certs.sh calls, and nothing else
    tools.mkdir()
    for tool in ("bash", "openssl", "mkdir", "chmod", "rm", "cat", "env"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(tools))

    certs, keys = local_cluster.make_credentials(tmp_path / "cluster", ["node-0", "node-1"])

    assert (certs / "ca.crt").is_file()
    for name in ("node-0", "node-1"):
        private = load_ssh_private_key((keys / name).read_bytes(), password=None)
        public_text = (keys / f"{name}.pub").read_text()
        assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.rstrip().endswith(f" {name}")
        public = load_ssh_public_key(public_text.encode())
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    first = (keys / "node-0").read_bytes()
    local_cluster.make_credentials(tmp_path / "cluster", ["node-0"])  # an existing pair is kept
    assert (keys / "node-0").read_bytes() == first
