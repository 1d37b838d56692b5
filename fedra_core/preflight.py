"""What a launcher checks before any Flower process starts, each problem in one line.

A run that cannot work (an experiment file that does not load, a data root or a split
file that is not there, an image a split file lists that is missing, a capacity beyond
the backbone's depth) otherwise fails only after a SuperLink and its ServerApp have
started, in a long traceback. ``check_run`` finds these on the launching machine, in a
second or two, and raises ``PreflightError`` naming the problem; the launchers
(``deploy/simulate.py``, ``deploy/local_cluster.py``, ``python -m fedra_core.compare``)
print it and exit with code 2 without starting Flower.

It checks what the run will read on this machine: the experiment (resolved from the
run config as the ServerApp resolves it), the backbone cache or the builtin recipe that
will build it, the data (the launchers' nodes run here too, so their data is checked
whatever ``evaluation.mode`` says; a ``data-root`` or ``backbone-cache`` given to every
node in its node-config is checked as well) and every image file a split file lists.
A node on another machine checks its own when it answers the capacity query.
"""

import dataclasses
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedra_core.config import ConfigError, Experiment, load_experiment

# flwr.common.config.parse_config_args: ``key=value`` pairs, a value quoted or up to a space.
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


class PreflightError(ValueError):
    """A run cannot work; the message names the problem in one line."""


def parse_run_config(text: str) -> dict[str, Any]:
    """Read ``--run-config`` as Flower does: ``k1=v1 k2='v 2'`` (TOML values) or a ``.toml`` file.

    Parameters
    ----------
    text : str
        The text given to ``-c`` / ``--run-config``; empty for none.

    Returns
    -------
    dict[str, Any]
        Keys and their TOML values (``"'a'"`` gives ``"a"``, ``"3"`` gives ``3``).
    """
    text = text.strip()
    if not text:
        return {}
    try:
        if text.endswith(".toml") and "=" not in text:
            path = Path(text).expanduser()
            if not path.is_file():
                raise PreflightError(f"--run-config: {path} does not exist")
            return _flatten(tomllib.loads(path.read_text()))
        return _flatten(tomllib.loads("\n".join(f"{k} = {v}" for k, v in _PAIR.findall(text))))
    except tomllib.TOMLDecodeError as err:
        raise PreflightError(f"--run-config {text!r} is not valid: values are TOML, strings quoted "
                             f"(e.g. experiment='configs/x.yaml' num-server-rounds=3): {err}") from None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def app_run_config(app_root: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]`` (pyproject.toml) with ``overrides`` applied.

    Flower refuses an override whose key the app does not declare; so does this.
    """
    pyproject = Path(app_root) / "pyproject.toml"
    try:
        defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise PreflightError(f"{pyproject} has no readable [tool.flwr.app.config] ({err!r})") from None
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise PreflightError(f"--run-config: unknown key {unknown[0]!r}; the app's keys are {sorted(defaults)}")
    return {**defaults, **overrides}


def experiment_path(app_root: Path, run_config: Mapping[str, Any]) -> Path:
    """The experiment file the ServerApp reads: ``experiment``, relative to the app's folder."""
    path = Path(str(run_config.get("experiment", "configs/default.yaml"))).expanduser()
    return path if path.is_absolute() else Path(app_root) / path


def experiment_of_run(app_root: Path, run_config: Mapping[str, Any]) -> Experiment:
    """The experiment the ServerApp runs for ``run_config`` (its rounds and seed overrides included)."""
    overrides: dict[str, Any] = {}
    try:
        if int(run_config.get("num-server-rounds", 0)) > 0:
            overrides["training.rounds"] = int(run_config["num-server-rounds"])
        if int(run_config.get("seed", -1)) >= 0:
            overrides["seed"] = int(run_config["seed"])
    except (TypeError, ValueError) as err:
        raise PreflightError(f"--run-config: num-server-rounds and seed are integers ({err})") from None
    try:
        return load_experiment(experiment_path(app_root, run_config), overrides)
    except ConfigError as err:
        raise PreflightError(str(err)) from None


def backbone_depth(experiment: Experiment) -> int:
    """Blocks of the backbone the run will use: its cache's, or the builtin recipe's if not built yet."""
    return cache_depth(experiment.backbone.cache_path, experiment.backbone.builtin, "backbone")


def cache_depth(cache: Path, builtin: str | None, key: str) -> int:
    """Blocks of the backbone in ``cache`` (the experiment's ``key``), or of its builtin recipe if not built yet."""
    from fedra_core.backbone import BackboneCacheError, read_meta  # torch: only once the experiment loaded

    if builtin:
        from fedra_core.pretrain import RECIPES

        if builtin not in RECIPES:
            raise PreflightError(f"{key}.builtin: {builtin!r} is not a builtin backbone; known: {sorted(RECIPES)}")
        try:
            held = read_meta(cache).source
        except BackboneCacheError:
            held = ""  # not built yet: the server builds it on first use
        if held and not held.startswith(f"builtin:{builtin}:"):
            raise PreflightError(f"{key}.cache {cache} holds another backbone ({held}), not the builtin "
                                 f"{builtin!r}; point {key}.cache elsewhere or set {key}.builtin to null")
        return int(RECIPES[builtin]["kwargs"]["depth"])
    try:
        return read_meta(cache).num_layers
    except BackboneCacheError as err:
        raise PreflightError(f"{key}.cache: {err}") from None


def architecture_depths(experiment: Experiment) -> dict[str, int]:
    """HeteroTune: each architecture's depth, from its cache or builtin recipe."""
    return {arch.name: cache_depth(arch.cache_path, arch.builtin, f"backbone.architectures[{arch.name}]")
            for arch in experiment.backbone.architectures}


def check_hetero_capacities(experiment: Experiment, depths: Mapping[str, int],
                            node_capacities: Sequence[int | None] = ()) -> None:
    """Every client's capacity (and node ``i``'s ``max-layers``) within 1..the depth of its own architecture."""
    archs = experiment.clients.architectures
    for client, (capacity, name) in enumerate(zip(experiment.clients.capacities, archs)):
        if not 1 <= capacity <= depths[name]:
            raise PreflightError(f"clients.capacities[{client}] = {capacity} is outside 1..{depths[name]} "
                                 f"(its architecture {name!r} has {depths[name]} blocks)")
    for node, capacity in enumerate(node_capacities):
        name = archs[node] if node < len(archs) else None
        if capacity is not None and name is not None and not 1 <= capacity <= depths[name]:
            raise PreflightError(f"--max-layers: node-{node} = {capacity} is outside 1..{depths[name]} "
                                 f"(its partition runs architecture {name!r}, {depths[name]} blocks)")
    slots = experiment.backbone.adapter.slots
    if slots > min(depths.values()):
        raise PreflightError(f"backbone.adapter.slots = {slots} exceeds the depth of an architecture {dict(depths)}")


def check_capacities(experiment: Experiment, depth: int, node_capacities: Sequence[int | None] = ()) -> None:
    """Every capacity (the experiment's, and nodes' ``max-layers``) within 1..depth."""
    for client, capacity in enumerate(experiment.clients.capacities):
        if not 1 <= capacity <= depth:
            raise PreflightError(f"clients.capacities[{client}] = {capacity} is outside 1..{depth} "
                                 f"(the backbone has {depth} blocks)")
    for node, capacity in enumerate(node_capacities):
        if capacity is not None and not 1 <= capacity <= depth:
            raise PreflightError(f"--max-layers: node-{node} = {capacity} is outside 1..{depth} "
                                 f"(the backbone has {depth} blocks)")


def check_data(experiment: Experiment, root: str | None = None) -> None:
    """The data root, the domains and the split files exist; every image a split file lists is there.

    ``root`` (a node's ``data-root``) replaces ``data.root``. A DomainNet-sized split
    file (several 100 000 lines) takes a few seconds: a file system lookup per image, as
    the loader does before the first round.
    """
    from fedra_core.datasets import domain_names

    cfg = experiment.data if root is None else dataclasses.replace(experiment.data, root=root)
    if cfg.dataset == "builtin-digits":
        from fedra_core.data import BUILTIN_DOMAINS

        unknown = [d for d in cfg.domains or () if d not in BUILTIN_DOMAINS]
        if unknown:
            raise PreflightError(f"data.domains: {unknown[0]!r} is not a builtin domain; known: {BUILTIN_DOMAINS}")
        names = tuple(cfg.domains or BUILTIN_DOMAINS)
    else:
        name = "data.root" if root is None else "data-root"
        folder = Path(str(cfg.root)).expanduser()
        if not folder.exists():
            raise PreflightError(f"{name} {folder} does not exist")
        if not folder.is_dir():
            raise PreflightError(f"{name} {folder} is not a folder")
        names = domain_names(cfg)
        if not names:
            raise PreflightError(f"{name} {folder} holds no domain folders")
        for domain in names:
            if cfg.dataset == "folder":
                _check_domain_folder(folder / domain)
            else:
                for split in ("train", "test"):
                    _check_split_file(folder, folder / f"{domain}_{split}.txt", cfg.dataset, cfg.num_classes)
    expected = len(names) * cfg.clients_per_domain
    if expected != experiment.num_clients:
        raise PreflightError(f"clients.capacities has {experiment.num_clients} entries but the data has "
                             f"{len(names)} domains x {cfg.clients_per_domain} clients per domain = {expected} clients")


def _check_domain_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise PreflightError(f"domain folder {folder} does not exist")
    if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        raise PreflightError(f"domain folder {folder} holds no class folders")


def _check_split_file(root: Path, split_file: Path, dataset: str, num_classes: int | None) -> None:
    from fedra_core.data import read_split_file

    try:
        entries = read_split_file(split_file)
    except FileNotFoundError:
        raise PreflightError(f"split file {split_file} does not exist") from None
    except ValueError as err:
        raise PreflightError(str(err)) from None
    limit = (num_classes or 100) if dataset == "domainnet" else None  # the loader keeps labels below it
    kept = [relative for relative, label in entries if limit is None or label < limit]
    if not kept:
        raise PreflightError(f"split file {split_file} lists no image with a label in the label space")
    missing = [relative for relative in kept if not (root / relative).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PreflightError(f"image file {root / missing[0]} listed in {split_file} does not exist{more}")


def check_node_cache(cache: str, depth: int) -> None:
    """A node's own ``backbone-cache`` exists and has the server's depth (else the node is excluded)."""
    from fedra_core.backbone import BackboneCacheError, read_meta

    try:
        layers = read_meta(Path(cache).expanduser()).num_layers
    except BackboneCacheError as err:
        raise PreflightError(f"--node-config backbone-cache: {err}") from None
    if layers != depth:
        raise PreflightError(f"--node-config backbone-cache {cache} has {layers} blocks, the server's backbone {depth}")


def check_experiment(experiment: Experiment, node_capacities: Sequence[int | None] = (),
                     node_config: Mapping[str, Any] | None = None) -> int:
    """Backbone, capacities and data of a loaded experiment; returns the backbone's depth.

    ``node_config`` holds what every node started here is given (``data-root``,
    ``backbone-cache``); without a ``data-root`` the nodes read ``data.root``.
    """
    node_config = node_config or {}
    if experiment.backbone.architectures:
        depths = architecture_depths(experiment)
        check_hetero_capacities(experiment, depths, node_capacities)
        depth = max(depths.values())
    else:
        depth = backbone_depth(experiment)
        check_capacities(experiment, depth, node_capacities)
    if "backbone-cache" in node_config:
        check_node_cache(str(node_config["backbone-cache"]), depth)
    if "data-root" not in node_config or experiment.evaluation.on_server:
        check_data(experiment)  # the nodes' data, the server's test sets, or both
    if "data-root" in node_config:
        check_data(experiment, str(node_config["data-root"]))
    if not experiment.evaluation.on_server:
        from fedra_core.federated import require_num_classes

        require_num_classes(experiment)  # ConfigError: the server has no data to count them from
    return depth


def check_run(app_root: Path, run_config: Mapping[str, Any], node_capacities: Sequence[int | None] = (),
              node_config: Mapping[str, Any] | None = None) -> Experiment:
    """Everything a run of the app with ``run_config`` (the ``--run-config`` overrides) needs here.

    Parameters
    ----------
    app_root : Path
        The Flower app's folder (its pyproject.toml and the experiment paths' base).
    run_config : Mapping[str, Any]
        Run-config overrides as ``parse_run_config`` returns them.
    node_capacities : Sequence[int | None]
        ``max-layers`` of each SuperNode a launcher starts (None: left to the experiment).
    node_config : Mapping[str, Any], optional
        The node-config every SuperNode a launcher starts is given besides its partition.

    Returns
    -------
    Experiment
        The experiment the ServerApp will run; raises ``PreflightError`` naming the problem.
    """
    resolved = app_run_config(app_root, run_config)
    experiment = experiment_of_run(app_root, resolved)
    where = experiment_path(app_root, resolved)
    try:
        check_experiment(experiment, node_capacities, node_config)
    except PreflightError as err:
        raise PreflightError(f"{where}: {err}") from None
    except ConfigError as err:  # raised by the data helpers on a bad setting
        raise PreflightError(f"{where}: {err}") from None
    return experiment
