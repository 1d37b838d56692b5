"""Run the Compose demo (deploy/compose.yml) for real under podman-compose, check its output, remove it.

1. Tools: podman, runc, debootstrap, podman-compose (installed with apt when missing, as root).
2. Images: a Debian bookworm base made with ``debootstrap --variant=minbase`` and
   ``podman import`` (no image registry is needed; kept as ``localhost/fedra-debian-base:bookworm``
   for the next run), the proxy's nginx image on it (kept too), and the project's image built
   from ``deploy/Dockerfile`` with ``--build-arg BASE=<that base>`` and the host's wheels
   (``deploy/compose/wheels.sh``, ``.wheels/`` reused), offline, under a tag of this run.
   Two builds are kept for later runs, each tagged with the digest of what goes into it, the
   newest only (``--rebuild`` builds both anew):
   ``localhost/fedra-compose-deps:<digest>``, the base with the pinned dependencies installed
   into the image's venv from ``.wheels/`` (digest: the base image's ID, deploy/Dockerfile,
   requirements.txt and the names of the wheels), which the project image is then built on,
   so a change of the app's source rebuilds only the app's layer; and
   ``localhost/fedra-compose-cache:<digest>``, the project image itself (digest: the base
   image's ID, deploy/Dockerfile, .dockerignore, wheels.sh, pyproject.toml and every source
   file of the build context), which a later run with the same inputs tags for itself
   instead of building anything. A clean machine builds everything.
3. Credentials: a CA with the SuperLink's and the proxy's certificates (``deploy/make_certs.sh``),
   one authentication key pair per SuperNode (``deploy/make_keys.sh``).
4. ``podman-compose up`` of the SuperLink and the proxy, registration of the three SuperNodes
   through the Control API inside the SuperLink's container, then the SuperNodes (12, 6 and 3
   blocks), which reach the SuperLink only through the proxy, over TLS, authenticated.
5. ``flwr run /app demo`` inside the SuperLink's container: a small experiment (a 12-block tiny
   ViT written here, or ``--experiment``; with ``--hetero``, HeteroTune over three tiny ViTs of
   different width and depth, one per SuperNode) for ``--rounds`` rounds.
6. Checks: ``rounds.jsonl`` holds round 0 and every round, in which every node trained
   its declared number of blocks; ``adapters.safetensors`` exists; through the proxy's
   public port a Control API request is refused; a SuperNode holds only the CA certificate
   and its own key and cannot reach the SuperLink directly.
7. Every container, network and volume of the compose project and this run's image tag are
   removed, pass or fail (and the work folder unless ``--keep``).

    python deploy/compose_test.py                       # exit 0: the demo ran and every check passed
    python deploy/compose_test.py --experiment deploy/docker.yaml --rounds 2 --keep
    python deploy/compose_test.py --hetero              # HeteroTune: each SuperNode on another architecture

Podman runs here with a containers.conf without default ulimits and with runc
(see ``containers_conf``); the same compose file runs under Docker Compose unchanged.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
COMPOSE_FILE = DEPLOY / "compose.yml"
BASE_IMAGE = "localhost/fedra-debian-base:bookworm"
PROXY_IMAGE = "localhost/fedra-proxy:bookworm"
PROJECT_CACHE = "localhost/fedra-compose-cache"  # the last built project image, tagged by its inputs' digest
DEPS_CACHE = "localhost/fedra-compose-deps"  # the base with the pinned dependencies in /opt/fedra, likewise
# deploy/Dockerfile's dependency step alone (the app's wheel left out): what DEPS_CACHE holds.
DEPS_DOCKERFILE = """ARG BASE
FROM ${BASE}
RUN --mount=type=bind,source=.wheels,target=/wheels \\
    python3 -m venv /opt/fedra \\
    && /opt/fedra/bin/pip install --no-cache-dir --no-index --find-links /wheels -r /wheels/requirements.txt
"""
# What deploy/Dockerfile's build reads (its context after .dockerignore) and what makes .wheels/.
IMAGE_INPUTS = ["deploy/Dockerfile", ".dockerignore", "deploy/compose/wheels.sh", "pyproject.toml", "README.md",
                "deploy/compose/flwr-config.toml"]
IMAGE_INPUT_FOLDERS = ["fedra_core", "server_app", "client_app", "configs"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"  # unless apt's own sources name another
APP_UID = 49999  # the image's user (deploy/Dockerfile)
NODES = {"node-0": 12, "node-1": 6, "node-2": 3}  # as the compose file's --node-config max-layers
TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 12, "num_heads": 2, "mlp_ratio": 2.0}
# --hetero: three architectures, smallest first (node-2 holds 3 of tiny-s's 4 blocks, FedRA inside its backbone)
HETERO_VITS = {"tiny-s": {**TINY_VIT, "embed_dim": 16, "depth": 4},
               "tiny-m": {**TINY_VIT, "depth": 6},
               "tiny-l": {**TINY_VIT, "embed_dim": 48, "num_heads": 4}}
# Through the proxy's public port: the Control API above all, the Runtime API, the API docs.
REFUSED = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/start-run"),
           ("POST", "/v1/runtime/get-nodes"), ("GET", "/docs"), ("GET", "/v1/fleet/get-run")]
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "podman-compose": "podman-compose",
         "openssl": "openssl", "ssh-keygen": "openssh-client"}


class ComposeTestError(Exception):
    """A step of the compose test failed; the message names it."""


STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[compose-test] {text} (+{time.monotonic() - STARTED:.0f} s)", flush=True)


def run(command: Sequence[str], env: dict[str, str] | None = None, check: bool = True,
        quiet: bool = True) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its last output lines."""
    result = subprocess.run(list(command), env=env, text=True, capture_output=quiet)
    if check and result.returncode != 0:
        output = ((result.stdout or "") + (result.stderr or "")).strip().splitlines()
        raise ComposeTestError(f"`{' '.join(command[:4])} ...` exited with {result.returncode}: "
                               + " | ".join(output[-6:]))
    return result


def install_tools() -> None:
    """apt-get install what is missing (root only: containers run rootful here)."""
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise ComposeTestError(f"missing {', '.join(missing)}: run as root or apt-get install them")
    say(f"installing {' '.join(missing)}")
    run(["apt-get", "update", "-qq"])
    run(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def containers_conf(workdir: Path) -> Path:
    """No default ulimits (the sandbox refuses setrlimit(RLIMIT_NOFILE)); runc, as crun fails here."""
    path = workdir / "containers.conf"
    path.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    return path


def image_exists(name: str, env: dict[str, str]) -> bool:
    return run(["podman", "image", "exists", name], env=env, check=False).returncode == 0


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 ``URIs:`` or a one-line ``deb`` entry), for debootstrap."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        for words in (line.split() for line in lines):
            uri = next((word for word in words[1:] if "://" in word), "") if words[:1] in (["URIs:"], ["deb"]) else ""
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return DEBIAN_MIRROR


def build_base_image(workdir: Path, env: dict[str, str]) -> None:
    """debootstrap minbase bookworm with Python 3.11 and venv, imported as BASE_IMAGE (kept)."""
    if image_exists(BASE_IMAGE, env):
        return
    say(f"building {BASE_IMAGE} with debootstrap")
    rootfs = workdir / "rootfs"
    run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs),
         debian_mirror()])
    for folder in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/info"):
        shutil.rmtree(rootfs / folder, ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, env=env,
                              capture_output=True, text=True)
    tar.wait()
    shutil.rmtree(rootfs)
    if imported.returncode != 0 or tar.returncode != 0:
        raise ComposeTestError(f"podman import of the debootstrap base failed: {imported.stderr.strip()[-400:]}")


def image_inputs_digest(env: dict[str, str]) -> str:
    """Digest of what the project image is built from: base image ID, build files, the context's sources."""
    digest = hashlib.sha256()
    base = run(["podman", "image", "inspect", "--format", "{{.Id}}", BASE_IMAGE], env=env).stdout.strip()
    digest.update(f"base {base}\npython {sys.version_info[:2]}\n".encode())
    files = [ROOT / name for name in IMAGE_INPUTS] + sorted(DEPLOY.glob("*.yaml"))
    for folder in IMAGE_INPUT_FOLDERS:
        files += sorted(path for path in (ROOT / folder).rglob("*") if path.is_file()
                        and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".key", ".pem"))
    for path in files:
        data = path.read_bytes() if path.is_file() else b"(absent)"
        digest.update(f"{path.relative_to(ROOT)} {len(data)}\n".encode() + data)
    return digest.hexdigest()[:20]


def kept_images(repository: str, env: dict[str, str]) -> list[str]:
    listed = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", repository], env=env, check=False)
    return [name for name in listed.stdout.split() if name.startswith(f"{repository}:")]


def keep(image: str, repository: str, digest: str, env: dict[str, str]) -> str:
    """Tag ``image`` as ``repository:digest``, the only one kept: older tags there are removed."""
    for old in kept_images(repository, env):
        if old != f"{repository}:{digest}":
            run(["podman", "rmi", old], env=env, check=False)  # untags, or frees the space if no other tag
    run(["podman", "tag", image, f"{repository}:{digest}"], env=env)
    return f"{repository}:{digest}"


def deps_digest(env: dict[str, str]) -> str:
    """Digest of the dependency layer's inputs: base image ID, deploy/Dockerfile, requirements, wheel names."""
    wheels = ROOT / ".wheels"
    digest = hashlib.sha256()
    base = run(["podman", "image", "inspect", "--format", "{{.Id}}", BASE_IMAGE], env=env).stdout.strip()
    digest.update(f"base {base}\n{DEPS_DOCKERFILE}\n".encode())
    digest.update((DEPLOY / "Dockerfile").read_bytes() + (wheels / "requirements.txt").read_bytes())
    names = sorted(path.name for path in wheels.glob("*.whl") if not path.name.startswith("fedra_flower-"))
    digest.update("\n".join(names).encode())
    return digest.hexdigest()[:20]


def build_deps_image(workdir: Path, env: dict[str, str], rebuild: bool) -> str:
    """The base with the pinned dependencies in /opt/fedra (kept as DEPS_CACHE:<digest>); its name."""
    digest = deps_digest(env)
    if not rebuild and image_exists(f"{DEPS_CACHE}:{digest}", env):
        say(f"dependencies unchanged: building on {DEPS_CACHE}:{digest}")
        return f"{DEPS_CACHE}:{digest}"
    say(f"building {DEPS_CACHE}:{digest}: the pinned dependencies from .wheels/, offline")
    dockerfile = workdir / "deps.Dockerfile"
    dockerfile.write_text(DEPS_DOCKERFILE)
    staging = f"{DEPS_CACHE}-build:{os.getpid()}"
    run(["podman", "build", "--network", "none", "--layers=false", "--build-arg", f"BASE={BASE_IMAGE}",
         "-f", str(dockerfile), "-t", staging, str(ROOT)], env=env)
    kept = keep(staging, DEPS_CACHE, digest, env)
    run(["podman", "rmi", staging], env=env, check=False)
    return kept


def build_images(workdir: Path, tag: str, env: dict[str, str], build: bool = True, rebuild: bool = False) -> None:
    """The proxy's nginx image (kept) and, if ``build``, the project's image from host wheels, offline.

    The project image is reused when one built from the same inputs is kept (``PROJECT_CACHE``);
    otherwise it is built from deploy/Dockerfile on the base with the dependencies (``DEPS_CACHE``).
    """
    build_base_image(workdir, env)
    if not image_exists(PROXY_IMAGE, env):
        say(f"building {PROXY_IMAGE} (Debian's nginx-light)")
        run(["podman", "build", "--network", "host", "--layers=false", "--build-arg", f"BASE={BASE_IMAGE}",
             "-f", str(DEPLOY / "compose" / "nginx.Dockerfile"), "-t", PROXY_IMAGE, str(DEPLOY / "compose")], env=env)
    if not build:
        return
    digest = image_inputs_digest(env)
    cached = f"{PROJECT_CACHE}:{digest}"
    if not rebuild and image_exists(cached, env):
        say(f"project image unchanged: {cached} tagged {tag}")
        run(["podman", "tag", cached, tag], env=env)
        return
    say("wheels for the image (deploy/compose/wheels.sh)")
    run(["bash", str(DEPLOY / "compose" / "wheels.sh"), sys.executable])
    base = build_deps_image(workdir, env, rebuild)
    say(f"building {tag} from deploy/Dockerfile on {base}, offline")
    run(["podman", "build", "--network", "none", "--layers=false", "--build-arg", f"BASE={base}",
         "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)], env=env)
    if image_inputs_digest(env) != digest:
        say("sources changed during the build: the image is not kept for later runs")
        return
    say(f"kept as {keep(tag, PROJECT_CACHE, digest, env)} for later runs with the same inputs")


def make_credentials(workdir: Path) -> tuple[Path, Path]:
    """CA, the SuperLink's and the proxy's certificates; a key pair per node; owners for the containers."""
    certs, keys = workdir / "certs", workdir / "keys"
    for name in ("superlink", "proxy"):  # one CA signs both; make_certs.sh reuses it
        run(["bash", str(DEPLOY / "make_certs.sh"), str(certs), name, "localhost", "127.0.0.1"])
        (certs / "server.crt").rename(certs / f"{name}.crt")
        (certs / "server.key").rename(certs / f"{name}.key")
    run(["bash", str(DEPLOY / "make_keys.sh"), str(keys), *NODES])
    # The app's user reads its own keys; ca.key is never mounted and stays the host's.
    for path in [certs / "superlink.key", *(keys / name for name in NODES)]:
        os.chown(path, APP_UID, APP_UID)
    return certs, keys


def write_tiny_experiment(workdir: Path, rounds: int, hetero: bool = False) -> tuple[Path, str, list[str]]:
    """Tiny ViT caches and a one-step experiment in a host folder mounted at /cache; each node's cache name.

    FedRA: one 12-block cache for every node. HeteroTune (``hetero``): three architectures
    of different width and depth (HETERO_VITS), node-0 on the largest, node-2 on the smallest.
    """
    sys.path.insert(0, str(ROOT))
    import torch
    import yaml

    from fedra_core.backbone import import_timm, write_cache

    cache = workdir / "cache"
    specs = HETERO_VITS if hetero else {"tiny-vit": TINY_VIT}
    for name, kwargs in specs.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = import_timm().create_model("vit_tiny_patch16_224", num_classes=10, **kwargs)
        write_cache(model, "vit_tiny_patch16_224", kwargs, cache / "backbones" / name, source=f"compose:{name}")
    if hetero:
        experiment = hetero_experiment(rounds)
        (cache / "compose.yaml").write_text(yaml.safe_dump(experiment))
        chown_tree(cache)
        return cache, "/cache/compose.yaml", list(reversed(HETERO_VITS))  # node-0: the largest
    experiment = {
        "name": "compose", "seed": 0,
        "backbone": {"cache": "/cache/backbones/tiny-vit", "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "domains": ["clean", "inverted", "sketch"],
                 "max_test_per_domain": 30},
        "clients": {"capacities": list(NODES.values())},
        "strategy": {"reply_timeout": 600},
        "training": {"rounds": rounds, "local_steps": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
    }
    (cache / "compose.yaml").write_text(yaml.safe_dump(experiment))
    chown_tree(cache)
    return cache, "/cache/compose.yaml", ["tiny-vit"] * len(NODES)


def hetero_experiment(rounds: int) -> dict:
    """HeteroTune over the three tiny architectures: node i's partition runs the i-th largest."""
    names = list(HETERO_VITS)  # smallest first
    return {
        "name": "compose", "seed": 0,
        "backbone": {"architectures": [{"name": n, "cache": f"/cache/backbones/{n}"} for n in names],
                     "adapter": {"rank": 4, "experts": 2, "slots": 2}},
        "data": {"dataset": "builtin-digits", "domains": ["clean", "inverted", "sketch"], "max_test_per_domain": 30},
        "clients": {"capacities": list(NODES.values()), "architectures": list(reversed(names))},
        "strategy": {"method": "hetero", "reply_timeout": 600},
        "training": {"rounds": rounds, "local_steps": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
    }


def chown_tree(path: Path) -> None:
    for folder, _, files in os.walk(path):
        os.chown(folder, APP_UID, APP_UID)
        for name in files:
            os.chown(Path(folder) / name, APP_UID, APP_UID)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Compose:
    """One podman-compose project of deploy/compose.yml; ``down`` removes all it made."""

    def __init__(self, project: str, env: dict[str, str]) -> None:
        self.project = project
        self.env = env

    def compose(self, *args: str) -> subprocess.CompletedProcess:
        return run(["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args], env=self.env)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def exec_in(self, service: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["podman", "exec", self.container(service), *command], env=self.env, check=check)

    def logs(self, service: str, lines: int = 40) -> str:
        result = run(["podman", "logs", "--tail", str(lines), self.container(service)], env=self.env, check=False)
        return result.stdout + result.stderr

    def listed(self, kind: str) -> list[str]:
        """IDs of the project's containers, networks or volumes (podman-compose labels them all)."""
        every = ["-a"] if kind == "container" else []
        command = ["podman", kind, "ls", "-q", *every, "--filter", f"label=io.podman.compose.project={self.project}"]
        return run(command, env=self.env, check=False).stdout.split()

    def down(self) -> list[str]:
        """Remove the project's containers, networks and volumes; return what could not be removed."""
        # podman-compose 1.0.3 `down -v` leaves the networks: remove what remains by ID.
        run(["podman-compose", "-p", self.project, "-f", str(COMPOSE_FILE), "down", "-v"], env=self.env, check=False)
        for kind in ("container", "network", "volume"):
            if ids := self.listed(kind):
                run(["podman", kind, "rm", "-f", *ids], env=self.env, check=False)
        return [f"{kind} {name}" for kind in ("container", "network", "volume") for name in self.listed(kind)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ComposeTestError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(2)


def online_nodes(compose: Compose) -> int:
    result = compose.exec_in("superlink", "flwr", "supernode", "list", "demo", "--format", "json", check=False)
    try:
        return sum(node.get("status") == "online" for node in json.loads(result.stdout)["nodes"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def start(compose: Compose, keys_in_container: Sequence[str]) -> None:
    """SuperLink and proxy; the nodes registered through the Control API in the SuperLink's container; nodes."""
    compose.compose("up", "-d", "--no-build", "proxy")
    wait_for(lambda: "Uvicorn running on https://" in compose.logs("superlink", 200), "the SuperLink", 600)
    for name in keys_in_container:
        compose.exec_in("superlink", "flwr", "supernode", "register", f"/keys/{name}.pub", "demo")
    compose.compose("up", "-d", "--no-build")
    wait_for(lambda: online_nodes(compose) == len(keys_in_container), "3 SuperNodes online", 900)


def run_experiment(compose: Compose, experiment: str, rounds: int) -> None:
    run_config = f"experiment='{experiment}' output-dir='/outputs' run-name='compose' num-server-rounds={rounds}"
    result = compose.exec_in("superlink", "flwr", "run", "/app", "demo", "--stream", "--run-config", run_config,
                          check=False)
    if result.returncode != 0:
        raise ComposeTestError(f"flwr run exited with {result.returncode}: "
                               + " | ".join((result.stdout + result.stderr).strip().splitlines()[-8:]))


def check_output(run_dir: Path, rounds: int, hetero: bool = False) -> None:
    """Round 0 and every round; in each, every node trained (status ok) its declared blocks.

    HeteroTune: every node on its own architecture, each architecture evaluated on every domain.
    """
    lines = (run_dir / "rounds.jsonl").read_text().splitlines() if (run_dir / "rounds.jsonl").is_file() else []
    records = [json.loads(line) for line in lines]
    if [r["round"] for r in records] != list(range(rounds + 1)):
        raise ComposeTestError(f"{run_dir}/rounds.jsonl holds rounds {[r['round'] for r in records]}, "
                               f"expected 0..{rounds}")
    for record in records[1:]:
        held = sorted(sum(row) for row in record["allocation"])
        trained = [c for c in record["clients"] if c.get("status") == "ok" and c.get("bytes_received", 0) > 0]
        if held != sorted(NODES.values()) or len(trained) != len(NODES):
            raise ComposeTestError(f"round {record['round']}: blocks held {held}, {len(trained)} of "
                                   f"{len(NODES)} nodes trained: {record['clients']}")
    if hetero:
        for record in records:
            if sorted(record.get("architectures") or {}) != sorted(HETERO_VITS):
                raise ComposeTestError(f"round {record['round']} evaluated the architectures "
                                       f"{sorted(record.get('architectures') or {})}, expected {sorted(HETERO_VITS)}")
        ran = {c.get("partition_id"): c.get("architecture") for c in records[-1]["clients"]}
        expected = dict(enumerate(reversed(HETERO_VITS)))
        if ran != expected:
            raise ComposeTestError(f"the nodes ran the architectures {ran}, expected {expected}")
    if not (run_dir / "adapters.safetensors").is_file():
        raise ComposeTestError(f"no adapters.safetensors in {run_dir}")


def check_isolation(compose: Compose, certs: Path, port: int) -> None:
    """Only the Fleet API behind the public port; a node holds only ca.crt and its key, no route to the SuperLink."""
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    for method, path in REFUSED:
        request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", method=method,
                                         data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                raise ComposeTestError(f"the proxy forwarded {method} {path} (HTTP {response.status})")
        except urllib.error.HTTPError as error:
            if error.code != 403:
                raise ComposeTestError(f"{method} {path} through the proxy: HTTP {error.code}, expected 403")
    held = compose.exec_in("supernode-0", "ls", "/certs", "/keys").stdout.split()
    if sorted(held) != sorted(["/certs:", "ca.crt", "/keys:", "node-0"]):
        raise ComposeTestError(f"supernode-0 holds {held}; expected only ca.crt and its own key")
    probe = "import socket; socket.create_connection(('superlink', 9093), timeout=10)"
    if compose.exec_in("supernode-0", "python3", "-c", probe, check=False).returncode == 0:
        raise ComposeTestError("supernode-0 reaches the SuperLink directly, not only through the proxy")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new temporary folder)")
    parser.add_argument("--experiment", default="",
                        help="experiment path inside the image, e.g. deploy/docker.yaml (default: a tiny one)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds to run (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (credentials, outputs)")
    parser.add_argument("--hetero", action="store_true",
                        help="HeteroTune: each SuperNode on a tiny ViT of another width and depth")
    parser.add_argument("--image", default="",
                        help="use this already built project image (kept) instead of building one")
    parser.add_argument("--rebuild", action="store_true",
                        help=f"build the dependency and project images even if {DEPS_CACHE} and {PROJECT_CACHE} "
                             "hold ones built from the same inputs")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: give a new or empty folder")
    return args


def prepare(args: argparse.Namespace, workdir: Path, env: dict[str, str]) -> str:
    """Credentials, experiment and outputs folder, named to the compose file in ``env``; the experiment's path."""
    certs, keys = make_credentials(workdir)
    outputs = workdir / "outputs"
    outputs.mkdir()
    os.chown(outputs, APP_UID, APP_UID)
    env.update(FEDRA_CERTS=str(certs), FEDRA_KEYS=str(keys), FEDRA_OUTPUTS=str(outputs))
    if args.experiment:
        return args.experiment
    cache, experiment, backbones = write_tiny_experiment(workdir, args.rounds, args.hetero)
    env.update(FEDRA_CACHE=str(cache), **{f"FEDRA_BACKBONE_{i}": name for i, name in enumerate(backbones)})
    return experiment


def demo(args: argparse.Namespace, compose: Compose, workdir: Path) -> None:
    """Build, start, run and check; raise ComposeTestError naming the first failed step."""
    started = time.monotonic()
    experiment = prepare(args, workdir, compose.env)
    build_images(workdir, compose.env["FEDRA_IMAGE"], compose.env, build=not args.image, rebuild=args.rebuild)
    built = time.monotonic()
    say(f"images ready after {built - started:.0f} s; starting the demo")
    start(compose, list(NODES))
    say(f"3 SuperNodes online after {time.monotonic() - built:.0f} s; running {args.rounds} rounds")
    run_started = time.monotonic()
    run_experiment(compose, experiment, args.rounds)
    say(f"run finished in {time.monotonic() - run_started:.0f} s")
    check_output(Path(compose.env["FEDRA_OUTPUTS"]) / "compose", args.rounds, args.hetero)
    check_isolation(compose, Path(compose.env["FEDRA_CERTS"]), int(compose.env["FEDRA_PROXY_PORT"]))


def clean_up(args: argparse.Namespace, compose: Compose, workdir: Path) -> list[str]:
    """The project's containers, networks, volumes, this run's image tag and work folder; what remains."""
    left = compose.down()
    if not args.image:
        run(["podman", "rmi", "-f", compose.env["FEDRA_IMAGE"]], env=compose.env, check=False)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return left


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        install_tools()
    except ComposeTestError as error:
        say(f"FAILED: {error}")
        return 1
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedra-compose-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_id = f"{os.getpid()}-{int(time.time())}"
    tag = args.image or f"localhost/fedra-compose-test:{run_id}"
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf(workdir)), "FEDRA_IMAGE": tag,
           "FEDRA_PROXY_IMAGE": PROXY_IMAGE, "FEDRA_PROXY_PORT": str(free_port())}
    compose = Compose(f"fedra-test-{run_id}", env)
    say(f"compose project {compose.project}, image {tag}, work folder {workdir}")
    # SIGTERM or SIGHUP (a CI job cancelled, a terminal closed) still reach the clean-up below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: sys.exit(128 + number))
    failure = ""
    try:
        demo(args, compose, workdir)
    except ComposeTestError as error:
        for service in ("superlink", "proxy", "supernode-0"):
            say(f"--- {service} log (last lines)\n{compose.logs(service)}")
        failure = str(error)
    finally:
        left = clean_up(args, compose, workdir)
    if left:
        failure = failure or f"left behind: {', '.join(left)}"
    if failure:
        say(f"FAILED: {failure}")
        return 1
    say(f"PASSED: {args.rounds} rounds over TLS through the proxy, 3 authenticated SuperNodes "
        f"(12/6/3 blocks), all removed; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
