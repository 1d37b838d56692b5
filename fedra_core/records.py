"""Run output: resolved config, per-round records, checkpoint, final adapters, plots."""

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from fedra_core.config import ConfigError, Experiment, experiment_from_dict

logger = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
CHECKPOINT = "checkpoint.safetensors"
ADAPTERS = "adapters.safetensors"
ROUNDS = "rounds.jsonl"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable."""


def _atomic_save(state: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file, fsync, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunOutput:
    """The folder ``outputs/<run-name>/`` of one run."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def rounds_path(self) -> Path:
        return self.dir / ROUNDS

    def write_config(self, experiment: Experiment, extra: Mapping[str, Any] | None = None) -> None:
        """Write the fully resolved experiment as ``config.yaml``."""
        values = experiment.to_dict()
        if extra:
            values["run"] = dict(extra)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))

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
        """All round records written so far."""
        if not self.rounds_path.is_file():
            return []
        return [json.loads(line) for line in self.rounds_path.read_text().splitlines() if line.strip()]

    def truncate_rounds(self, last_round: int) -> None:
        """Drop records after ``last_round`` (a resumed run rewrites them)."""
        kept = [r for r in self.read_rounds() if r["round"] <= last_round]
        tmp = self.rounds_path.with_name(f".{ROUNDS}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.rounds_path)

    def save_checkpoint(self, state: State, server_round: int, rng: np.random.Generator,
                        extra: Mapping[str, Any] | None = None) -> None:
        """Global state, round and RNG state in one atomically written file."""
        metadata = {"round": str(server_round),
                    "rng": json.dumps(rng.bit_generator.state, default=_json_default),
                    "extra": json.dumps(dict(extra or {}), default=_json_default)}
        _atomic_save(state, self.dir / CHECKPOINT, metadata)

    def load_checkpoint(self) -> tuple[State, int, np.random.Generator, dict[str, Any]]:
        """Read the checkpoint back: state, last complete round, RNG, extra info."""
        path = self.dir / CHECKPOINT
        if not path.is_file():
            raise CheckpointError(f"no checkpoint to resume from at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata()
            rng = np.random.default_rng()
            rng.bit_generator.state = json.loads(metadata["rng"])
            return state, int(metadata["round"]), rng, json.loads(metadata.get("extra", "{}"))
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from err

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
