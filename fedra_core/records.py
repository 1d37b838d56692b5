"""Run output: resolved config, per-round records, checkpoint, final adapters, plots."""

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedra_core.config import ConfigError, Experiment, experiment_from_dict

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
CHECKPOINT = "checkpoint.safetensors"
LOCK = ".lock"
ADAPTERS = "adapters.safetensors"
ROUNDS = "rounds.jsonl"


SERVER_PREFIX = "server::"  # checkpoint keys of the strategy's own state (e.g. InclusiveFL's momentum)


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable."""


class RecordsError(ValueError):
    """``rounds.jsonl`` holds a line that is not a round record (other than a torn last line)."""


class RunInUse(RuntimeError):
    """Another process holds the run folder (a run or a resume of it is going on)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds: the global state after ``round`` and all server state to go on."""

    state: State
    round: int
    rng: np.random.Generator
    extra: dict[str, Any]
    server_state: State


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry is data of its own)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a uniquely named temporary sibling, fsync it, rename it over ``path``, fsync the folder.

    A crash leaves either the old file or the new one, never half of one; two writers
    never share a temporary file.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_save(state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Safetensors written atomically (see ``_atomic_replace``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    _atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _atomic_text(path: Path, text: str) -> None:
    _atomic_replace(path, lambda tmp: tmp.write_text(text))


def claim_run_dir(base: Path, name: str) -> Path:
    """Create ``base/name`` (or ``name-2``, ``-3``...) exclusively: two runs never share a folder."""
    base.mkdir(parents=True, exist_ok=True)
    candidate, n = base / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base / f"{name}-{n}"


class RunOutput:
    """The folder ``outputs/<run-name>/`` of one run."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = None

    def lock(self) -> None:
        """Hold the folder for this process (released when it exits); ``RunInUse`` if another holds it."""
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunInUse(f"{self.dir} is in use by another process (pid {holder}): a run or a resume of "
                           "it is going on; wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock = fd

    def unlock(self) -> None:
        """Release the folder (also done by the process's exit)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def rounds_path(self) -> Path:
        return self.dir / ROUNDS

    def write_config(self, experiment: Experiment, extra: Mapping[str, Any] | None = None) -> None:
        """Write the fully resolved experiment as ``config.yaml``."""
        values = experiment.to_dict()
        if extra:
            values["run"] = dict(extra)
        _atomic_text(self.dir / "config.yaml", yaml.safe_dump(values, sort_keys=False))

    def _read_config_values(self) -> dict[str, Any]:
        path = self.dir / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {self.dir} holds no run")
        return yaml.safe_load(path.read_text()) or {}

    def read_extras(self) -> dict[str, Any]:
        """What ``write_config`` recorded beside the experiment (backbone, depth, weights' source)."""
        return dict(self._read_config_values().get("run") or {})

    def read_config(self) -> Experiment:
        """The experiment of ``config.yaml`` (without the run's recorded extras)."""
        values = self._read_config_values()
        values.pop("run", None)
        path = self.dir / "config.yaml"
        try:
            return experiment_from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def append_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's record to ``rounds.jsonl`` and flush it to disk."""
        with open(self.rounds_path, "a") as handle:
            handle.write(json.dumps(record, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_rounds(self) -> list[dict[str, Any]]:
        """All round records written so far.

        A torn last line (the process was killed while appending it) is skipped with a
        warning: the checkpoint, written atomically, says which rounds are complete. A
        bad line anywhere else raises ``RecordsError`` naming it.
        """
        if not self.rounds_path.is_file():
            return []
        lines = [(n, line) for n, line in enumerate(self.rounds_path.read_text(errors="replace").split("\n"), 1)
                 if line.strip()]
        records = []
        for index, (number, line) in enumerate(lines):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                    raise ValueError("not a round record")
            except ValueError as err:
                if index == len(lines) - 1:
                    logger.warning("%s: skipping a torn last line %d (%s)", self.rounds_path, number, err)
                    break
                raise RecordsError(f"{self.rounds_path}: line {number} is not a round record: {err}") from None
            records.append(record)
        return records

    def truncate_rounds(self, last_round: int) -> None:
        """Drop records after ``last_round`` and any torn line (a resumed run rewrites them)."""
        kept = [r for r in self.read_rounds() if r["round"] <= last_round]
        _atomic_text(self.rounds_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, state: State, server_round: int, rng: np.random.Generator,
                        extra: Mapping[str, Any] | None = None, server_state: State | None = None) -> None:
        """Global state, round, RNG state and the strategy's own state in one atomically written file.

        A state holding NaN or an infinity is refused: the last good checkpoint stays.
        """
        tensors = {**state, **{SERVER_PREFIX + k: v for k, v in (server_state or {}).items()}}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"refusing to checkpoint a state with NaN or infinite values ({bad[0]})")
        metadata = {"round": str(server_round),
                    "rng": json.dumps(rng.bit_generator.state, default=_json_default),
                    "extra": json.dumps(dict(extra or {}), default=_json_default)}
        _atomic_save(tensors, self.dir / CHECKPOINT, metadata)

    def load_checkpoint(self) -> Checkpoint:
        """Read the checkpoint back; ``CheckpointError`` in one line for anything unreadable."""
        path = self.dir / CHECKPOINT
        if not path.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {}
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(metadata["rng"])
            extra = json.loads(metadata.get("extra", "{}"))
            if not isinstance(extra, dict):
                raise ValueError("its 'extra' metadata is not a mapping")
            server_round = int(metadata["round"])
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as err:
            raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                                  "it cannot be resumed") from err
        state = {k: v for k, v in tensors.items() if not k.startswith(SERVER_PREFIX)}
        server_state = {k[len(SERVER_PREFIX):]: v for k, v in tensors.items() if k.startswith(SERVER_PREFIX)}
        return Checkpoint(state, server_round, rng, extra, server_state)

    def save_adapters(self, state: State, metadata: Mapping[str, str]) -> Path:
        """The final global trainable state as ``adapters.safetensors``."""
        path = self.dir / ADAPTERS
        _atomic_save(state, path, {k: str(v) for k, v in metadata.items()})
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
