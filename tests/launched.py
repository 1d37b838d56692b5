"""What the launchers leave running (processes found by FLWR_HOME or by process group, via /proc), and the
tiny three-domain experiment the launcher tests run, with its complete round records."""

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

DOMAINS = ["clean", "inverted", "sketch"]


def tiny_experiment(tmp_path: Path, cache: Path, rounds: int = 2, **strategy: object) -> Path:
    """A 3-client experiment (one per domain, 6/4/2 blocks) on the tiny cache, written to ``tmp_path``."""
    values = {
        "name": "tiny",
        "seed": 3,
        "backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
        "data": {"dataset": "builtin-digits", "domains": DOMAINS, "max_test_per_domain": 30},
        "clients": {"capacities": [6, 4, 2]},
        "strategy": {"reply_timeout": 300, **strategy},
        "training": {"rounds": rounds, "local_steps": 1, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def complete_records(run_dir: Path) -> list[dict]:
    """The complete records of rounds.jsonl (a line the server is writing, or a torn one, is left out)."""
    path = run_dir / "rounds.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def processes_with_flwr_home(flwr_home: Path) -> list[int]:
    """PIDs whose environment holds this FLWR_HOME: what a launcher (or a process it started) runs."""
    wanted = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def group_members(pgid: int) -> list[int]:
    """PIDs (not zombies) in process group ``pgid``: a session leader's children, nginx's workers."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def leftovers(pids: list[int], flwr_home: Path) -> list[int]:
    """Anything still running that a launcher started: by FLWR_HOME, or in one of ``pids``' groups."""
    return sorted(set(processes_with_flwr_home(flwr_home)) | {p for pid in pids for p in group_members(pid)})


def stop_launcher(launcher: subprocess.Popen, grace: float = 120.0) -> None:
    """End a launcher a test started in its own session: SIGTERM (it cleans up), SIGKILL if it hangs."""
    if launcher.poll() is not None:
        return
    os.killpg(launcher.pid, signal.SIGTERM)
    try:
        launcher.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
