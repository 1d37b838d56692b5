"""What the launchers leave running: processes found by FLWR_HOME or by process group, via /proc."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


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
