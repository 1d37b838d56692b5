"""Failures that show before Flower starts: the launchers' one-line refusals (fedra_core.preflight).

Each launcher is run as a user runs it; none of these tests starts a Flower process.
"""

import json
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from fedra_core import preflight
from fedra_core.config import ConfigError, load_experiment
from fedra_core.preflight import PreflightError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from launched import processes_with_flwr_home  # noqa: E402


def _write(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def _missing_root(tmp_path: Path, cache: Path) -> tuple[Path, str]:
    """Reproduction 1: data.root does not exist."""
    absent = tmp_path / "absent"
    return _write(tmp_path / "x.yaml", {
        "backbone": {"cache": str(cache)}, "clients": {"capacities": [2]},
        "data": {"dataset": "nicopp", "root": str(absent), "domains": ["autumn"]},
    }), f"data.root {absent} does not exist"


def _missing_image(tmp_path: Path, cache: Path) -> tuple[Path, str]:
    """Reproduction 2: a split file lists an image that is not there."""
    root = tmp_path / "domainnet"
    (root / "clipart" / "cat").mkdir(parents=True)
    (root / "clipart" / "cat" / "1.jpg").write_bytes(b"")
    (root / "clipart_train.txt").write_text("clipart/cat/1.jpg 0\nclipart/cat/2.jpg 0\nclipart/cat/3.jpg 0\n")
    (root / "clipart_test.txt").write_text("clipart/cat/1.jpg 0\n")
    return _write(tmp_path / "x.yaml", {
        "backbone": {"cache": str(cache)}, "clients": {"capacities": [2]},
        "data": {"dataset": "domainnet", "root": str(root), "domains": ["clipart"]},
    }), (f"image file {root / 'clipart/cat/2.jpg'} listed in {root / 'clipart_train.txt'} does not exist "
         "(and 1 more)")


def _capacity_beyond_depth(tmp_path: Path, cache: Path) -> tuple[Path, str]:
    """Reproduction 3: a capacity of 13 on the 12-block builtin backbone (not even built yet)."""
    return _write(tmp_path / "x.yaml", {
        "backbone": {"cache": str(tmp_path / "not-built-yet"), "builtin": "digits-vit"},
        "clients": {"capacities": [12, 13, 8, 6, 4, 3]},
    }), "clients.capacities[1] = 13 is outside 1..12 (the backbone has 12 blocks)"


REPRODUCTIONS = [_missing_root, _missing_image, _capacity_beyond_depth]


def _launch(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    return result, time.monotonic() - start


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("reproduction", REPRODUCTIONS, ids=lambda f: f.__name__.strip("_"))
def test_simulate_refuses_in_one_line_without_starting_flower(tmp_path: Path, tiny_vit_cache: Path,
                                                              reproduction) -> None:
    experiment, cause = reproduction(tmp_path, tiny_vit_cache)
    flwr_home = tmp_path / "flwr-home"

    result, seconds = _launch(str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(flwr_home),
                              "-c", f"experiment='{experiment}'", cwd=tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    assert _last_line(result) == f"simulate.py: {experiment}: {cause}"
    assert not flwr_home.exists() and processes_with_flwr_home(flwr_home) == []  # Flower never started
    assert seconds < 60


def test_local_cluster_refuses_in_one_line_without_starting_anything(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment, cause = _capacity_beyond_depth(tmp_path, tiny_vit_cache)
    workdir = tmp_path / "cluster"
    launcher = str(ROOT / "deploy" / "local_cluster.py")

    result, _ = _launch(launcher, "--workdir", str(workdir), "--max-layers", "12,12,8,6,4,3",
                        "-c", f"experiment='{experiment}'", cwd=tmp_path)
    bad_node_config, _ = _launch(launcher, "--workdir", str(workdir), "--max-layers", "12,10,8,6,4,3",
                          "-c", f"experiment='{ROOT / 'configs' / 'default.yaml'}'", "--node-config", "device=cuda:0",
                          cwd=tmp_path)

    assert result.returncode == 2 and _last_line(result) == f"local_cluster.py: {experiment}: {cause}"
    assert bad_node_config.returncode == 2
    assert _last_line(bad_node_config).startswith("local_cluster.py: --node-config 'device=cuda:0' is not valid")
    assert not workdir.exists()  # no certificate, log or process


def test_comparison_refuses_in_one_line_before_its_first_run(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment, cause = _missing_root(tmp_path, tiny_vit_cache)

    result, _ = _launch("-m", "fedra_core.compare", "run", "--base", str(experiment), "--methods", "fedra",
                        "--out", str(tmp_path / "cmp"), cwd=ROOT)

    assert result.returncode == 2, result.stdout + result.stderr
    assert _last_line(result) == f"compare: {experiment}: {cause}"
    assert not (tmp_path / "cmp" / "runs").exists() or not any((tmp_path / "cmp" / "runs").iterdir())


def test_simulate_refuses_a_federation_smaller_than_the_experiment(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _write(tmp_path / "x.yaml", {"backbone": {"cache": str(tiny_vit_cache)},
                                              "clients": {"capacities": [6, 5, 4, 3, 2, 1]}})

    result, _ = _launch(str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "h"),
                        "--num-supernodes", "2", "-c", f"experiment='{experiment}'", cwd=tmp_path)

    assert result.returncode == 2
    assert _last_line(result) == ("simulate.py: --num-supernodes 2: the experiment has 6 clients "
                                  "(clients.capacities), one simulated SuperNode each")


# ---------------------------------------------------------------- the checks themselves
def test_run_config_is_read_as_flower_reads_it() -> None:
    from flwr.common.config import parse_config_args

    for text in ["", "experiment='configs/x.yaml' num-server-rounds=3", 'run-name="a b" resume=true seed=-1',
                 "output-dir='/tmp/o'   num-server-rounds=2"]:
        assert preflight.parse_run_config(text) == parse_config_args([text] if text else None)
    with pytest.raises(PreflightError, match="values are TOML"):
        preflight.parse_run_config("experiment=configs/x.yaml")
    with pytest.raises(PreflightError, match="unknown key 'rounds'"):
        preflight.check_run(ROOT, {"rounds": 3})


def test_checks_resolve_the_experiment_as_the_server_app_does(tmp_path: Path, tiny_vit_cache: Path) -> None:
    experiment = _write(tmp_path / "x.yaml", {"backbone": {"cache": str(tiny_vit_cache)},
                                              "clients": {"capacities": [6, 5, 4, 3, 2, 1]}})

    resolved = preflight.check_run(ROOT, {"experiment": str(experiment), "num-server-rounds": 4, "seed": 9})

    assert (resolved.training.rounds, resolved.seed, resolved.num_clients) == (4, 9, 6)
    default = preflight.check_run(ROOT, {})  # the embedded default: its builtin backbone may not exist yet
    assert default == load_experiment(ROOT / "configs" / "default.yaml")


@pytest.mark.parametrize("values, message", [
    ({"backbone": {"cache": "/nowhere"}}, "backbone.cache: no backbone cache at /nowhere"),
    ({"data": {"domains": ["clean", "fog"]}, "clients": {"capacities": [2, 2]}}, "'fog' is not a builtin domain"),
    ({"clients": {"capacities": [2, 2]}}, "clients.capacities has 2 entries but the data has 6 domains"),
    ({"clients": {"capacities": [7, 1, 1, 1, 1, 1]}}, r"clients.capacities\[0\] = 7 is outside 1..6"),
])
def test_each_problem_is_named(tmp_path: Path, tiny_vit_cache: Path, values: dict, message: str) -> None:
    experiment = load_experiment(_write(tmp_path / "x.yaml", {"backbone": {"cache": str(tiny_vit_cache)}}),
                                 {f"{section}.{key}": value for section, keys in values.items()
                                  for key, value in keys.items()})
    with pytest.raises(PreflightError, match=message):
        preflight.check_experiment(experiment)


def test_folder_datasets_and_foreign_builtin_caches_are_checked(tmp_path: Path, tiny_vit_cache: Path) -> None:
    (tmp_path / "photos" / "a" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "b").mkdir()
    folder = load_experiment(_write(tmp_path / "f.yaml", {
        "backbone": {"cache": str(tiny_vit_cache)}, "clients": {"capacities": [2, 2]},
        "data": {"dataset": "folder", "root": str(tmp_path / "photos")}}))
    with pytest.raises(PreflightError, match=f"domain folder {tmp_path / 'photos' / 'b'} holds no class folders"):
        preflight.check_experiment(folder)

    foreign = tmp_path / "exported"
    shutil.copytree(tiny_vit_cache, foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "source": "timm:vit_base:pretrained"}))
    builtin = load_experiment(_write(tmp_path / "b.yaml",
                                     {"backbone": {"cache": str(foreign), "builtin": "digits-vit"}}))
    with pytest.raises(PreflightError, match=r"holds another backbone \(timm:vit_base:pretrained\)"):
        preflight.check_experiment(builtin)


def test_nodes_own_data_root_and_cache_are_checked(tmp_path: Path, tiny_vit_cache: Path) -> None:
    (tmp_path / "nodes" / "a" / "cat").mkdir(parents=True)
    values = {"backbone": {"cache": str(tiny_vit_cache)}, "clients": {"capacities": [2]},
              "data": {"dataset": "folder", "root": str(tmp_path / "server"), "domains": ["a"]},
              "evaluation": {"mode": "clients"}}
    experiment = load_experiment(_write(tmp_path / "x.yaml", values))

    with pytest.raises(ConfigError, match="data.num_classes must say"):  # a server without data cannot count them
        preflight.check_experiment(experiment, node_config={"data-root": str(tmp_path / "nodes")})
    counted = load_experiment(tmp_path / "x.yaml", {"data.num_classes": 1})
    assert preflight.check_experiment(counted, node_config={"data-root": str(tmp_path / "nodes")}) == 6
    with pytest.raises(PreflightError, match=f"data-root {tmp_path / 'elsewhere'} does not exist"):
        preflight.check_experiment(counted, node_config={"data-root": str(tmp_path / "elsewhere")})
    with pytest.raises(PreflightError, match=f"data.root {tmp_path / 'server'} does not exist"):
        preflight.check_experiment(counted)  # the nodes read data.root when given no data-root
    with pytest.raises(PreflightError, match="--node-config backbone-cache: no backbone cache at /nowhere"):
        preflight.check_experiment(counted, node_config={"data-root": str(tmp_path / "nodes"),
                                                         "backbone-cache": "/nowhere"})


def test_plain_flwr_run_gets_the_six_node_federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject.toml's [tool.flwr.federations], as Flower 1.41 migrates it into a fresh FLWR_HOME."""
    from flwr.cli.config_migration import migrate

    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")  # the migration rewrites the file it reads
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))

    migrate(str(app), [], ignore_legacy_usage=True)  # what `flwr run .` does first

    config = tomllib.loads((tmp_path / "flwr-home" / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"]["address"] == ":local:"
    default = load_experiment(ROOT / "configs" / "default.yaml")
    assert config["local"]["options"]["num-supernodes"] == default.num_clients == 6
    assert config["local"]["options"]["backend"]["client-resources"]["num-cpus"] == 1
    assert "\n[tool.flwr.federations]" in (ROOT / "pyproject.toml").read_text()  # nothing migrated it here
