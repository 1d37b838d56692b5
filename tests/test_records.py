"""Run files survive kill -9 and concurrent runs: torn lines, bad checkpoints, shared folders."""

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedra_core.records import (
    CHECKPOINT,
    CheckpointError,
    RecordsError,
    RunInUse,
    RunOutput,
    claim_run_dir,
)


def _output_with_rounds(tmp_path: Path, tail: str) -> RunOutput:
    output = RunOutput(tmp_path / "run")
    for r in range(3):
        output.append_round({"round": r, "mean_accuracy": 0.1 * r})
    with open(output.rounds_path, "a") as handle:
        handle.write(tail)
    return output


def test_a_torn_last_line_is_skipped_and_truncate_removes_it(tmp_path: Path) -> None:
    output = _output_with_rounds(tmp_path, '{"round": 3, "mean_acc')
    assert [r["round"] for r in output.read_rounds()] == [0, 1, 2]
    output.truncate_rounds(1)
    assert output.rounds_path.read_text().count("\n") == 2
    assert [r["round"] for r in output.read_rounds()] == [0, 1]


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path: Path) -> None:
    output = _output_with_rounds(tmp_path, 'garbage\n{"round": 3}\n')
    with pytest.raises(RecordsError, match="line 4 is not a round record"):
        output.read_rounds()


def test_checkpoint_round_trips_with_the_servers_own_state(tmp_path: Path) -> None:
    output = RunOutput(tmp_path / "run")
    rng = np.random.default_rng(5)
    rng.random(3)
    state, momentum = {"head.weight": torch.randn(2, 3)}, {"blocks.1.a": torch.randn(4)}
    output.save_checkpoint(state, 7, rng, server_state=momentum)

    checkpoint = output.load_checkpoint()

    assert checkpoint.round == 7 and set(checkpoint.state) == {"head.weight"}
    assert torch.equal(checkpoint.server_state["blocks.1.a"], momentum["blocks.1.a"])
    assert checkpoint.rng.random() == rng.random()
    assert not [p for p in output.dir.iterdir() if p.name.endswith(".tmp")]


def test_a_non_finite_state_is_never_checkpointed(tmp_path: Path) -> None:
    output = RunOutput(tmp_path / "run")
    output.save_checkpoint({"a": torch.ones(2)}, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="NaN or infinite"):
        output.save_checkpoint({"a": torch.tensor([1.0, float("inf")])}, 2, np.random.default_rng(0))
    assert output.load_checkpoint().round == 1


def test_a_truncated_checkpoint_is_reported_in_one_line(tmp_path: Path) -> None:
    output = RunOutput(tmp_path / "run")
    output.save_checkpoint({"a": torch.ones(1000)}, 1, np.random.default_rng(0))
    path = output.dir / CHECKPOINT
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        output.load_checkpoint()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rng", ['{"bit_generator": 5}', '"text"', "[1, 2]"])
def test_bad_rng_metadata_is_a_checkpoint_error(tmp_path: Path, rng: str) -> None:
    output = RunOutput(tmp_path / "run")
    save_file({"a": torch.ones(1)}, str(output.dir / CHECKPOINT), metadata={"round": "1", "rng": rng})
    with pytest.raises(CheckpointError, match="unreadable"):
        output.load_checkpoint()


def _claim(base: str, queue: "multiprocessing.Queue[str]") -> None:
    queue.put(str(claim_run_dir(Path(base), "same")))


def test_concurrent_runs_with_one_name_claim_different_folders(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_claim, args=(str(tmp_path), queue)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    claimed = sorted(queue.get() for _ in processes)
    assert claimed == sorted(str(tmp_path / n) for n in ("same", "same-2", "same-3", "same-4"))


def test_a_run_folder_in_use_cannot_be_taken_by_a_second_process(tmp_path: Path) -> None:
    first = RunOutput(tmp_path / "run")
    first.lock()
    with pytest.raises(RunInUse, match=r"in use by another process \(pid \d+\)"):
        RunOutput(tmp_path / "run").lock()
    first.unlock()
    RunOutput(tmp_path / "run").lock()


def test_config_is_written_atomically(tmp_path: Path) -> None:
    from fedra_core.config import Experiment

    output = RunOutput(tmp_path / "run")
    output.write_config(Experiment(), {"backbone": "x"})
    assert output.read_extras() == {"backbone": "x"}
    assert [p.name for p in output.dir.iterdir()] == ["config.yaml"]
    assert json.loads(json.dumps(output.read_config().to_dict()))["name"] == "default"


def test_a_second_resume_of_a_run_in_progress_is_refused(tmp_path: Path, tiny_vit_cache: Path) -> None:
    from fedra_core.config import ConfigError, experiment_from_dict
    from fedra_core.run import ServerRun

    experiment = experiment_from_dict({
        "backbone": {"cache": str(tiny_vit_cache), "lora": {"rank": 2}},
        "data": {"dataset": "builtin-digits", "domains": ["clean", "noisy"], "max_test_per_domain": 10},
        "clients": {"capacities": [2, 2]}})
    running = ServerRun(experiment, claim_run_dir(tmp_path, "r"))
    with pytest.raises(ConfigError, match="in use by another process"):
        ServerRun(experiment, running.output.dir, resume=True)
    with pytest.raises(ConfigError, match="holds no run to resume"):
        ServerRun(experiment, tmp_path / "absent", resume=True)
