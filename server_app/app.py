"""The ServerApp: resolve the experiment, run the FedRA strategy, write the run's output."""

import logging
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedra_core.config import ConfigError, Experiment, load_experiment
from fedra_core.run import ServerRun, describe_state, unique_run_dir
from server_app.grid import PromptGrid
from server_app.strategy import FedRA

APP_ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG_KEYS = ("experiment", "output-dir", "num-server-rounds", "run-name", "resume", "seed")

app = ServerApp()


def experiment_from_run_config(run_config: dict[str, Any]) -> Experiment:
    """The experiment file named by ``experiment`` (relative to the app), with overrides."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key {unknown[0]!r}; known: {RUN_CONFIG_KEYS}")
    path = Path(str(run_config.get("experiment", "configs/default.yaml"))).expanduser()
    if not path.is_absolute():
        path = APP_ROOT / path
    overrides: dict[str, Any] = {}
    if int(run_config.get("num-server-rounds", 0)) > 0:
        overrides["training.rounds"] = int(run_config["num-server-rounds"])
    if "seed" in run_config and int(run_config["seed"]) >= 0:
        overrides["seed"] = int(run_config["seed"])
    return load_experiment(path, overrides)


def run_dir_of(run_config: dict[str, Any], experiment: Experiment, resume: bool) -> Path:
    """``<output-dir>/<run-name>``; a new run never reuses a finished run's folder."""
    base = Path(str(run_config.get("output-dir") or "outputs")).expanduser().resolve()
    name = str(run_config.get("run-name") or experiment.name)
    return base / name if resume else unique_run_dir(base, name)


def is_simulation(grid: Grid) -> bool:
    """Whether the nodes are Flower's simulated SuperNodes (its simulation engine's in-memory grid)."""
    return type(grid).__name__ == "InMemoryGrid"


def _show_core_logs() -> None:
    """Send fedra_core's progress messages (backbone pretraining, resume) to Flower's log."""
    core = logging.getLogger("fedra_core")
    core.setLevel(INFO)
    for handler in logging.getLogger("flwr").handlers:
        if handler not in core.handlers:
            core.addHandler(handler)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a FedRA experiment to the end (or resume one) and write its output folder."""
    _show_core_logs()
    simulation = is_simulation(grid)
    if not simulation:
        grid = PromptGrid(grid)  # replies collected as they arrive, not every 3 s; arrays packed into one
    run_config = dict(context.run_config)
    experiment = experiment_from_run_config(run_config)
    resume = bool(run_config.get("resume", False))
    run = ServerRun(experiment, run_dir_of(run_config, experiment, resume), resume=resume)
    log(INFO, "FedRA run '%s' -> %s", experiment.name, run.output.dir)
    log(INFO, "Backbone %s: %d blocks; global trainable state: %s", run.meta.timm_name, run.num_layers,
        describe_state(run.state))
    strategy = FedRA(experiment, run.num_layers, run.rng, round_offset=run.start_round,
                     backbone_source=run.meta.source, simulation=simulation,
                     architectures=run.architectures, refine=run.refine)
    strategy.load_server_state(run.server_state)
    strategy.discover(grid, wait_for=experiment.num_clients)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        actual = run.start_round + server_round
        if server_round == 0 and run.start_round > 0:
            return None  # resumed: round 0 was recorded by the first run
        client_eval = strategy.last_eval
        if server_round == 0 and experiment.evaluation.on_clients:
            client_eval = strategy.evaluate_now(grid, actual, arrays)  # the untuned model, on the nodes' data
        record = run.end_round(actual, arrays.to_torch_state_dict(), strategy.last_record if server_round else None,
                               strategy.server_state(), client_eval)
        _log_round(record, experiment.training.rounds)
        return MetricRecord({"mean-accuracy": record["mean_accuracy"]}) if record.get("accuracy") else None

    strategy.start(grid, ArrayRecord(run.state), num_rounds=run.remaining_rounds,
                   timeout=experiment.strategy.reply_timeout, evaluate_fn=evaluate_fn)
    table = run.finish()
    log(INFO, "Results (accuracy %%, global model, per domain):\n%s", table)
    log(INFO, "Output written to %s", run.output.dir)


def _log_round(record: dict[str, Any], rounds: int) -> None:
    failures = len(record.get("failures", [])) + len((record.get("client_eval") or {}).get("failures", []))
    tail = f" | {failures} client(s) failed" if failures else ""
    if not record.get("accuracy"):
        log(INFO, "round %d/%d | not evaluated | %.1fs%s", record["round"], rounds, record["round_seconds"], tail)
        return
    accuracy = " ".join(f"{d}={100 * a:.1f}" for d, a in record["accuracy"].items())
    log(INFO, "round %d/%d | mean accuracy %.1f%% | %s | %.1fs%s", record["round"], rounds,
        100 * record["mean_accuracy"], accuracy, record["round_seconds"], tail)
