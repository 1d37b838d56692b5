"""The Compose demo end to end: deploy/compose_test.py under podman-compose (images, TLS proxy, 2 rounds)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINER_TOOLS = ("podman", "runc", "debootstrap", "podman-compose")


def _names(kind: str) -> list[str]:
    """Names of every podman container, network or volume, or image tag, on this machine."""
    command = {"container": ["podman", "ps", "-a", "--format", "{{.Names}}"],
               "network": ["podman", "network", "ls", "--format", "{{.Name}}"],
               "volume": ["podman", "volume", "ls", "--format", "{{.Name}}"],
               "image": ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]}[kind]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()


def test_compose_demo_runs_two_rounds_through_the_proxy(tmp_path: Path) -> None:
    missing = [tool for tool in CONTAINER_TOOLS if shutil.which(tool) is None]
    assert not missing, f"{missing} needed for the Compose demo: make test-tools (apt-get install {' '.join(missing)})"
    workdir = tmp_path / "compose"

    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "compose_test.py"), "--workdir", str(workdir)],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "PASSED: 2 rounds over TLS through the proxy" in log
    assert not workdir.exists()  # credentials and outputs removed with the containers
    project, tag = re.search(r"compose project (\S+), image (\S+), work folder", log).groups()
    assert tag.startswith("localhost/fedra-compose-test:"), tag
    assert not [name for kind in ("container", "network", "volume") for name in _names(kind) if project in name]
    assert tag not in _names("image")
