"""Compare methods: run experiments through Flower simulation or read finished runs, then tabulate and plot.

``python -m fedra_core.compare run --base configs/bench-feature.yaml --methods fedra depthfl
--seeds 0 1 --out outputs/compare/feature`` writes one experiment file per method and
seed (the base with ``strategy.method``, ``seed`` and ``name`` replaced), runs each
through ``deploy/simulate.py`` (a real Flower simulation), skips runs already finished,
resumes interrupted ones from their checkpoint, and writes ``results.md``,
``accuracy.png`` and ``participation.png`` into ``--out``.
``python -m fedra_core.compare report RUN_DIR ... --out DIR`` only reads finished runs.

Before the first run, the base experiment is checked (``fedra_core.preflight``: backbone,
data, capacities). The command exits 0 once every run finished, 2 when an experiment
cannot run (nothing started), 1 when a run failed (the rest are not started), 130 when
interrupted; it ends with one line naming the problem.
"""

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

from fedra_core.config import load_experiment
from fedra_core.methods import method_names
from fedra_core.plots import _pyplot, save_round_plot
from fedra_core.preflight import PreflightError, check_experiment

ROOT = Path(__file__).resolve().parent.parent
SIMULATE = ROOT / "deploy" / "simulate.py"
LAST_ROUNDS = 5  # the table's second mean: over the last rounds, less noisy than the final round alone
_ROUND_LINE = re.compile(r"round (\d+)/(\d+) \| mean accuracy ([\d.]+)%")


class RunFailed(RuntimeError):
    """A run of the comparison failed; the message names it and its cause in one line."""


@dataclass(frozen=True)
class Run:
    """A finished run read from its output folder."""

    path: Path
    method: str
    seed: int
    records: list[dict[str, Any]]
    num_layers: int

    @property
    def final(self) -> dict[str, Any]:
        return [r for r in self.records if r.get("accuracy")][-1]

    def last_rounds_mean(self, count: int = LAST_ROUNDS) -> float:
        """Mean accuracy over domains, averaged over the last ``count`` evaluated rounds."""
        evaluated = [r["mean_accuracy"] for r in self.records if r.get("accuracy") and r.get("round", 0) > 0]
        return float(np.mean(evaluated[-count:])) if evaluated else float(self.final["mean_accuracy"])

    @property
    def seconds(self) -> float:
        return float(self.final.get("elapsed_seconds", 0.0))


def read_run(path: Path) -> Run:
    """Read ``config.yaml`` and ``rounds.jsonl`` of a run folder; errors name the missing file."""
    config_file, rounds_file = path / "config.yaml", path / "rounds.jsonl"
    for needed in (config_file, rounds_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: {path} is not a finished run")
    config = yaml.safe_load(config_file.read_text()) or {}
    records = [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
    if not any(r.get("accuracy") for r in records):
        raise ValueError(f"{rounds_file} holds no evaluated round")
    planned, last = (config.get("training") or {}).get("rounds"), records[-1].get("round")
    if isinstance(planned, int) and isinstance(last, int) and last < planned:
        raise FileNotFoundError(f"{path} is unfinished: its last round is {last} of {planned} "
                                "(`python -m fedra_core.compare run` with its base and method resumes it)")
    strategy = config.get("strategy", {})
    method = strategy.get("method", "fedra")
    if method == "hetero" and strategy.get("cmga") is False:
        method = "hetero (CMGA off)"  # one method, two settings: told apart in the tables
    if strategy.get("surrogates"):
        method = f"{method} + surrogates ({strategy['surrogates']})"  # FedRA with block surrogates
    if strategy.get("head_calibration"):
        every = strategy.get("calibrate_every") or 0
        method = f"{method} + {strategy['head_calibration']} head ({f'every {every}' if every else 'last round'})"
    layers = int(config.get("run", {}).get("num_layers") or 0)
    if not layers:
        layers = max((len(r["allocation"][0]) for r in records if r.get("allocation")), default=0)
    return Run(path, method, int(config.get("seed", 0)), records, layers)


def _is_finished(path: Path, rounds: int) -> bool:
    rounds_file = path / "rounds.jsonl"
    if not (path / "results.md").is_file() or not rounds_file.is_file():
        return False
    lines = [json.loads(line) for line in rounds_file.read_text().splitlines() if line.strip()]
    return bool(lines) and lines[-1].get("round") == rounds


def _progress(done: int, total: int, label: str, stream: TextIO) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rounds | {label}   ")
    stream.flush()


def simulate(experiment_file: Path, out: Path, run_name: str, rounds_before: int, rounds_total: int,
             log_file: Path, stream: TextIO = sys.stderr, resume: bool = False) -> float:
    """Run one experiment through ``deploy/simulate.py``, showing progress; return its wall seconds.

    With ``resume`` the run continues from its checkpoint. If this process is
    interrupted (Ctrl-C, SIGTERM, SIGHUP), the simulation is stopped too, which stops
    its SuperLink; the run's checkpoint stays for the next call to resume from. A run
    that does not complete raises ``RunFailed`` with the launcher's last line, which
    states the run's final status and its cause.
    """
    run_config = f"experiment='{experiment_file}' output-dir='{out / 'runs'}' run-name='{run_name}'"
    command = [sys.executable, str(SIMULATE), "--flwr-home", str(out / ".flwr-home"), "-c",
               run_config + (" resume=true" if resume else "")]
    start = time.perf_counter()
    last = ""
    with open(log_file, "a" if resume else "w", buffering=1) as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                last = line.strip() or last
                match = _ROUND_LINE.search(line)
                if match:
                    _progress(rounds_before + int(match.group(1)), rounds_total,
                              f"{run_name}: round {match.group(1)}/{match.group(2)}, mean {match.group(3)}%",
                              stream)
        except BaseException:
            proc.terminate()  # deploy/simulate.py stops its SuperLink on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        code = proc.wait()
    if code != 0:
        raise RunFailed(f"{run_name} failed: {last or f'exit code {code}'} (log {log_file})")
    return time.perf_counter() - start


def run_all(base: Path, methods: Sequence[str], seeds: Sequence[int], out: Path,
            overrides: dict[str, Any] | None = None, stream: TextIO = sys.stderr) -> list[Path]:
    """Run every method x seed of ``base`` (skipping finished runs, resuming interrupted ones).

    Parameters
    ----------
    base : Path
        The experiment file every run starts from.
    methods : Sequence[str]
        Values of ``strategy.method``.
    seeds : Sequence[int]
        Seeds; each method runs once per seed.
    out : Path
        Comparison folder: ``configs/``, ``runs/``, ``logs/`` and the report go there.
    overrides : dict, optional
        Dotted keys applied to every run (e.g. ``{"training.rounds": 5}``).
    stream : TextIO
        Where the progress bar is drawn.

    Returns
    -------
    list[Path]
        Run folders, in method-then-seed order.
    """
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f"--methods: {unknown[0]!r} is not a method; expected some of {method_names()}")
    for sub in ("configs", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    base_experiment = load_experiment(base, overrides)
    try:  # the runs differ in method, seed and name only: one check covers them all
        check_experiment(base_experiment)
    except PreflightError as err:
        raise PreflightError(f"{base}: {err}") from None
    rounds = base_experiment.training.rounds
    plan = [(m, s) for m in methods for s in seeds]
    paths = []
    for index, (method, seed) in enumerate(plan):
        name = f"{base_experiment.name}-{method}-s{seed}"
        experiment = load_experiment(base, {**(overrides or {}), "strategy.method": method, "seed": seed,
                                            "name": name})
        config_file = out / "configs" / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(experiment.to_dict(), sort_keys=False))
        run_dir = out / "runs" / name
        paths.append(run_dir)
        if _is_finished(run_dir, rounds):
            _progress((index + 1) * rounds, len(plan) * rounds, f"{name}: already finished", stream)
            continue
        resume = (run_dir / "checkpoint.safetensors").is_file()  # interrupted after a round: continue it
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # interrupted before its first round ended: nothing to keep
        simulate(config_file, out, name, index * rounds, len(plan) * rounds, out / "logs" / f"{name}.log", stream,
                 resume=resume)
    stream.write("\n")
    return paths


# ---------------------------------------------------------------- report
def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def results_table(runs: Sequence[Run]) -> str:
    """Markdown table: final per-domain and mean accuracy per method (mean ± std over seeds).

    Besides the final round's mean, the mean over the last ``LAST_ROUNDS`` rounds
    shows where a method's curve is, not where one noisy round put it.
    """
    if not runs:
        raise ValueError("no runs to tabulate")
    domains = list(runs[0].final["accuracy"])
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    header = ("| method | " + " | ".join(domains) +
              f" | **mean** | last {LAST_ROUNDS} rounds | seeds | rounds | run time |\n"
              "|---|" + "---|" * (len(domains) + 5))
    lines = [header]
    for method, group in by_method.items():
        cells = [_mean_std([r.final["accuracy"][d] for r in group]) for d in domains]
        mean = _mean_std([r.final["mean_accuracy"] for r in group])
        last = _mean_std([r.last_rounds_mean() for r in group])
        seeds = ",".join(str(r.seed) for r in group)
        seconds = np.mean([r.seconds for r in group])
        lines.append(f"| {method} | " + " | ".join(cells) +
                     f" | **{mean}** | {last} | {seeds} | {group[0].final['round']} | {seconds:.0f} s |")
    return "\n".join(lines)


def paired_table(runs: Sequence[Run], reference: str) -> str:
    """Markdown table: each method minus ``reference``, seed by seed (final round / last rounds), and their mean.

    Differences paired by seed cancel what a seed does to every method alike (its data
    split, its test draw), so they are less noisy than differences of the means. Empty
    when ``reference`` is not among the runs or shares no seed with another method.
    """
    by_method: dict[str, dict[int, Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, {})[run.seed] = run
    if reference not in by_method:
        return ""
    base = by_method[reference]
    seeds = sorted({seed for group in by_method.values() for seed in group} & set(base))
    lines = [f"| method − {reference} | " + " | ".join(f"seed {s}" for s in seeds) +
             f" | mean (final) | mean (last {LAST_ROUNDS} rounds) | seeds paired |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for method, group in by_method.items():
        paired = [s for s in seeds if s in group]
        if method == reference or not paired:
            continue
        final = {s: group[s].final["mean_accuracy"] - base[s].final["mean_accuracy"] for s in paired}
        last = {s: group[s].last_rounds_mean() - base[s].last_rounds_mean() for s in paired}
        cells = [f"{100 * final[s]:+.1f} / {100 * last[s]:+.1f}" if s in final else "–" for s in seeds]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_signed_mean_std(list(final.values()))} | "
                     f"{_signed_mean_std(list(last.values()))} | {len(paired)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _signed_mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:+.1f}"
    return f"{100 * np.mean(values):+.1f} ± {100 * np.std(values):.1f}"


def architecture_table(runs: Sequence[Run]) -> str:
    """HeteroTune: each architecture's mean accuracy over the domains per method (final, last rounds), seeds' spread.

    Empty when no run evaluated several architectures.
    """
    archs = list(dict.fromkeys(a for r in runs for a in (r.final.get("architectures") or {})))
    if not archs:
        return ""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    lines = ["| method | " + " | ".join(f"{a} (final) | {a} (last {LAST_ROUNDS})" for a in archs) + " | seeds |",
             "|---|" + "---|" * (2 * len(archs) + 1)]
    for method, group in by_method.items():
        cells = []
        for arch in archs:
            held = [r for r in group if arch in (r.final.get("architectures") or {})]
            if not held:
                cells += ["–", "–"]
                continue
            cells.append(_mean_std([r.final["architectures"][arch]["mean_accuracy"] for r in held]))
            cells.append(_mean_std([_last_architecture_mean(r, arch) for r in held]))
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {','.join(str(r.seed) for r in group)} |")
    return "\n".join(lines)


def _last_architecture_mean(run: Run, arch: str, count: int = LAST_ROUNDS) -> float:
    values = [r["architectures"][arch]["mean_accuracy"] for r in run.records
              if r.get("round", 0) > 0 and arch in (r.get("architectures") or {})]
    return float(np.mean(values[-count:]))


def participation(run: Run) -> tuple[np.ndarray, list[str]]:
    """How often each domain's clients trained each block, summed over rounds: ``(domains, blocks)``.

    Read from each record's ``allocation`` rows, ``rows[].domain`` and ``clients[].status``;
    a client that failed or was rejected does not count.
    """
    domains: list[str] = []
    counts: dict[str, np.ndarray] = {}
    for record in run.records:
        if not record.get("allocation"):
            continue
        status = {c["node_id"]: c.get("status", "ok") for c in record.get("clients", [])}
        for row, held in zip(record["rows"], record["allocation"]):
            if status.get(row["node_id"], "ok") != "ok":
                continue
            domain = row.get("domain") or f"client {row['partition_id']}"
            if domain not in counts:
                domains.append(domain)
                counts[domain] = np.zeros(len(held), dtype=int)
            counts[domain] += np.asarray(held, dtype=int)
    if not counts:
        return np.zeros((0, run.num_layers), dtype=int), []
    return np.stack([counts[d] for d in domains]), domains


def plot_accuracy_per_method(runs: Sequence[Run], path: Path, title: str = "") -> Path:
    """Mean accuracy of the global model per round, one line per method (mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    for method, group in by_method.items():
        curves = [{r["round"]: r["mean_accuracy"] for r in run.records if r.get("accuracy")} for run in group]
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(rounds, [100 * np.mean([c[t] for c in curves]) for t in rounds], lw=2,
                label=f"{method} ({len(group)} seed{'s' if len(group) > 1 else ''})")
    return save_round_plot(fig, ax, path, "mean accuracy over domains (%)", title or "Global model accuracy per method")


def plot_participation(runs: Sequence[Run], path: Path) -> Path:
    """Per method (first seed), stacked bars: how many client-rounds of each domain trained each block."""
    plt = _pyplot()
    first: dict[str, Run] = {}
    for run in runs:
        first.setdefault(run.method, run)
    fig, axes = plt.subplots(1, len(first), figsize=(3.2 * len(first), 3.4), sharey=True, squeeze=False)
    for ax, (method, run) in zip(axes[0], first.items()):
        counts, domains = participation(run)
        bottom = np.zeros(counts.shape[1] if counts.size else run.num_layers)
        for domain, row in zip(domains, counts):
            ax.bar(np.arange(len(row)), row, bottom=bottom, label=domain)
            bottom += row
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("block")
        ax.set_xticks(range(len(bottom)))
        ax.tick_params(axis="x", labelsize=7)
    axes[0][0].set_ylabel("client-rounds that trained the block")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dirs: Sequence[Path], out: Path, title: str = "", paired_with: str | None = None) -> str:
    """Write ``results.md``, ``accuracy.png`` and ``participation.png`` for finished runs; return the table.

    ``paired_with`` names the method every other is compared with seed by seed
    (default ``fedra`` when it ran, else the first method).
    """
    runs = [read_run(Path(p)) for p in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(runs)
    reference = paired_with or ("fedra" if any(r.method == "fedra" for r in runs) else runs[0].method)
    if paired_with and all(r.method != paired_with for r in runs):
        raise ValueError(f"--paired-with {paired_with}: no run of that method among {sorted({r.method for r in runs})}")
    paired = paired_table(runs, reference)
    if paired:
        table += ("\n\nPaired by seed, mean accuracy over domains minus that of " + reference +
                  f" (points; final round / mean of the last {LAST_ROUNDS} rounds):\n\n" + paired)
    blocks = ["", "Blocks trained (client-rounds, all domains) per method, first seed:", "",
              "| method | " + " | ".join(str(i) for i in range(runs[0].num_layers)) + " |",
              "|---|" + "---|" * runs[0].num_layers]
    seen = set()
    for run in runs:
        if run.method not in seen:
            seen.add(run.method)
            counts, _ = participation(run)
            total = counts.sum(axis=0) if counts.size else np.zeros(run.num_layers, dtype=int)
            blocks.append(f"| {run.method} | " + " | ".join(str(int(c)) for c in total) + " |")
    per_architecture = architecture_table(runs)
    if per_architecture:
        blocks = ["", "Each architecture's global model, mean accuracy over every domain:", "", per_architecture,
                  *blocks]
    heading = f"# {title}\n\n" if title else ""
    (out / "results.md").write_text(heading + table + "\n" + "\n".join(blocks) + "\n")
    plot_accuracy_per_method(runs, out / "accuracy.png", title)
    plot_participation(runs, out / "participation.png")
    return table + (f"\n\n{per_architecture}" if per_architecture else "")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. training.rounds=5")
    return key, yaml.safe_load(value)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (the terminal closed) interrupt as Ctrl-C does: the running simulation stops."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``run`` (simulate, then report) or ``report`` (finished runs only); the exit code."""
    parser = argparse.ArgumentParser(prog="python -m fedra_core.compare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run method x seed through Flower simulation, then report")
    run.add_argument("--base", type=Path, required=True, help="experiment file, e.g. configs/bench-feature.yaml")
    run.add_argument("--methods", nargs="+", default=list(method_names()))
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                     help="dotted override for every run, e.g. training.rounds=5 (repeatable)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--title", default="")
    rep = sub.add_parser("report", help="table and plots of finished runs")
    rep.add_argument("runs", nargs="+", type=Path)
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("--title", default="")
    for command in (run, rep):
        command.add_argument("--paired-with", default=None, metavar="METHOD",
                             help="the method every other is compared with, seed by seed (default fedra, "
                                  "else the first method)")
    args = parser.parse_args(argv)
    _stop_on_signals()
    try:
        if args.command == "run":
            out = args.out.resolve()
            paths = run_all(args.base.resolve(), args.methods, args.seeds, out, dict(args.overrides))
        else:
            out, paths = args.out.resolve(), args.runs
        print(report(paths, out, args.title, args.paired_with))
    except ValueError as err:  # PreflightError, ConfigError, an unknown method: nothing was run
        return _fail(2, str(err))
    except (RunFailed, FileNotFoundError) as err:  # a run failed, or a folder is no finished run
        return _fail(1, str(err))
    except KeyboardInterrupt:
        return _fail(130, "interrupted: the simulation was stopped; `run` again resumes it")
    print(f"wrote {out / 'results.md'}, {out / 'accuracy.png'}, {out / 'participation.png'}")
    return 0


def _fail(code: int, message: str) -> int:
    """The comparison's last line: what went wrong, on one line."""
    sys.stderr.write("\n")  # end the progress bar's line
    print(f"compare: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
