"""Block surrogates: the file beside the cache, its size, its fidelity, sub-models with surrogates, settings."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from fedra_core.backbone import assemble, import_timm, read_meta, write_cache
from fedra_core.config import ConfigError, experiment_from_dict
from fedra_core.methods import method_for
from fedra_core.surrogates import (
    PREFIX,
    SURROGATES_FILE,
    Recipe,
    Surrogate,
    SurrogateError,
    backbone_identity,
    ensure_surrogates,
    load_surrogates,
    proxy_images,
    read_info,
    surrogate_source,
)

QUICK = Recipe(images=64, epochs=1, batch_size=32)  # the file's machinery, not its quality
FIT = Recipe(images=256, epochs=4, batch_size=32)  # enough to learn the tiny blocks


def _copy(cache: Path, tmp_path: Path, name: str = "tiny") -> Path:
    copy = tmp_path / name
    shutil.copytree(cache, copy)
    return copy


@pytest.fixture(scope="module")
def fitted_cache(tiny_vit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny cache with its surrogates distilled."""
    cache = _copy(tiny_vit_cache, tmp_path_factory.mktemp("surrogates"))
    ensure_surrogates(cache, FIT)
    return cache


def _experiment(cache: Path, **strategy: object) -> object:
    return experiment_from_dict({"backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
                                 "clients": {"capacities": [2] * 6},
                                 "strategy": {"surrogates": "frozen", **strategy}})


def test_file_is_written_atomically_with_its_digest_and_kept_while_current(tiny_vit_cache: Path,
                                                                           tmp_path: Path) -> None:
    cache = _copy(tiny_vit_cache, tmp_path)

    info = ensure_surrogates(cache, QUICK)

    assert info["source"] == surrogate_source(QUICK, backbone_identity(cache))
    assert sorted(p.name for p in cache.iterdir()) == ["backbone.safetensors", "meta.json", SURROGATES_FILE]
    written = (cache / SURROGATES_FILE).stat().st_mtime_ns
    assert ensure_surrogates(cache, QUICK) == info  # current: not distilled again
    assert (cache / SURROGATES_FILE).stat().st_mtime_ns == written


def test_stale_file_is_rebuilt_and_refused_by_a_node(tiny_vit_cache: Path, tmp_path: Path) -> None:
    cache = _copy(tiny_vit_cache, tmp_path)
    ensure_surrogates(cache, QUICK)
    other = tmp_path / "other"  # other weights, same architecture
    timm = import_timm()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=7, **read_meta(cache).kwargs)
    write_cache(model, "vit_tiny_patch16_224", read_meta(cache).kwargs, other)
    shutil.copy(cache / SURROGATES_FILE, other / SURROGATES_FILE)  # distilled from the first backbone

    with pytest.raises(SurrogateError, match="distilled for backbone .*this cache holds .*python -m fedra_core.surrogates build"):
        load_surrogates(other, [0], QUICK.rank)
    rebuilt = ensure_surrogates(other, QUICK)
    smaller = ensure_surrogates(cache, Recipe(rank=4, images=64, epochs=1, batch_size=32))  # another recipe

    assert rebuilt["backbone"] == backbone_identity(other) != backbone_identity(cache)
    assert smaller["rank"] == "4" and load_surrogates(cache, [0], 4)[0]["0"].down.weight.shape == (4, 32)
    with pytest.raises(SurrogateError, match="at rank 4; this cache holds .* and the run asks rank 8"):
        load_surrogates(cache, [0], 8)


def test_a_surrogate_is_a_few_percent_of_a_block() -> None:
    from fedra_core.pretrain import RECIPES

    timm = import_timm()
    kwargs = RECIPES["digits-vit"]["kwargs"]
    with torch.device("meta"):
        model = timm.create_model("vit_tiny_patch16_224", **kwargs)
        surrogate = Surrogate(kwargs["embed_dim"], Recipe().rank)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    assert sum(p.numel() for p in surrogate.parameters()) / block < 0.05


def test_an_untrained_surrogate_is_the_plain_skip() -> None:
    tokens = torch.randn(2, 5, 32)  # (B, N, C)
    assert torch.equal(Surrogate(32, 8)(tokens), tokens)


def _features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)  # (B, C)


def test_sub_models_with_surrogates_compute_features_closer_to_the_full_model(fitted_cache: Path) -> None:
    meta = read_meta(fitted_cache)
    images = proxy_images(Recipe(images=128, seed=5), meta).tensors[0]  # other proxy images than distilled on
    full, _ = assemble(fitted_cache, None, 0)
    target = _features(full, images)
    method = method_for(_experiment(fitted_cache))
    plain_error, surrogate_error = 0.0, 0.0
    for layers in ([0, 3], [1, 4], [2, 5], [0, 5]):
        plain, _ = assemble(fitted_cache, layers, 0)
        with_surrogates, _ = method.assemble(fitted_cache, layers, 0)
        plain_error += float((_features(plain, images) - target).pow(2).mean())
        surrogate_error += float((_features(with_surrogates, images) - target).pow(2).mean())

    assert surrogate_error < 0.8 * plain_error


def test_a_sub_model_runs_its_blocks_and_the_surrogates_in_depth_order(fitted_cache: Path) -> None:
    method = method_for(_experiment(fitted_cache))
    model, _ = method.assemble(fitted_cache, [1, 4], 0)
    tokens = torch.randn(2, 17, 32)  # (B, 1 + 16 patches, C)
    s, b = model.surrogates, model.blocks
    with torch.no_grad():
        expected = s["5"](b[1](s["3"](s["2"](b[0](s["0"](tokens))))))
        assert torch.equal(model.blocks(tokens), expected)
    assert len(model.blocks) == 2 and [n for n, _ in model.blocks.named_children()] == ["1", "4"]


def test_only_the_skipped_blocks_surrogates_are_read(fitted_cache: Path) -> None:
    method = method_for(_experiment(fitted_cache))

    modules, nbytes = load_surrogates(fitted_cache, [2, 5], FIT.rank)
    _, stats = method.assemble(fitted_cache, [0, 1, 3, 4], 0)
    _, plain = assemble(fitted_cache, [0, 1, 3, 4], 0)

    assert sorted(modules.keys()) == ["2", "5"]
    assert nbytes == sum(t.numel() * t.element_size() for t in modules.state_dict().values())
    read = {k.split(".")[1] for k in stats.keys_read if k.startswith(PREFIX)}
    assert read == {"2", "5"}
    assert stats.bytes_read == plain.bytes_read + nbytes
    assert nbytes < 0.2 * (plain.bytes_read / 4)  # two surrogates: a fraction of one block


def test_surrogates_are_no_trainable_state_and_get_no_gradient(fitted_cache: Path) -> None:
    plain_method = method_for(experiment_from_dict({"backbone": {"cache": str(fitted_cache)}}))
    method = method_for(_experiment(fitted_cache))
    plain, _ = plain_method.assemble(fitted_cache, [1, 4], 7)
    model, _ = method.assemble(fitted_cache, [1, 4], 7)
    plain = plain_method.build(plain, 7, 6)
    model = method.build(model, 7, 6)

    model(torch.randn(2, 3, 16, 16)).sum().backward()

    assert set(method.trainable_state(model)) == set(plain_method.trainable_state(plain))
    assert all(p.grad is None and not p.requires_grad for p in model.surrogates.parameters())
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None for p in lora)


@pytest.mark.parametrize(("strategy", "message"), [
    ({"surrogates": "sometimes"}, "strategy.surrogates: 'sometimes' is not valid; expected null, 'frozen', "
                                  "'redistill' or 'tuned'"),
    ({"surrogates": "frozen", "method": "first"}, "strategy.surrogates: 'frozen' is not valid; expected null for "
                                                  "strategy.method 'first'"),
    ({"surrogates": "frozen", "surrogates_rank": 0}, "strategy.surrogates_rank: 0 is not valid"),
    ({"surrogates": "redistill", "surrogates_every": 0}, "strategy.surrogates_every: 0 is not valid"),
    ({"surrogates": "frozen", "surrogates_images": 0}, "strategy.surrogates_images: 0 is not valid"),
    ({"surrogates": "frozen", "surrogates_epochs": 0}, "strategy.surrogates_epochs: 0 is not valid"),
])
def test_bad_settings_are_clear_config_errors(strategy: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        experiment_from_dict({"strategy": strategy})


def test_fedra_cover_takes_surrogates_too(fitted_cache: Path) -> None:
    method = method_for(_experiment(fitted_cache, method="fedra-cover"))
    model, _ = method.assemble(fitted_cache, [0, 2], 0)
    assert sorted(model.surrogates.keys()) == ["1", "3", "4", "5"]


def test_redistill_sends_the_skipped_blocks_surrogates_and_refreshes_them_every_n_rounds(fitted_cache: Path) -> None:
    from fedra_core.evaluation import GlobalModel
    from fedra_core.surrogates import StandIns

    experiment = _experiment(fitted_cache, surrogates="redistill", surrogates_every=2)
    server = method_for(experiment)
    server.stand_ins = StandIns(experiment)
    server.stand_ins.recipe = QUICK  # a short re-distillation; the file was distilled by FIT
    state = GlobalModel(fitted_cache, 7, server).initial_state()
    sent = server.extras([1, 4], 6)
    trained = {k: v + 0.05 if "lora_B" in k else v for k, v in state.items()}  # the global blocks changed

    before = {k: v.clone() for k, v in server.memory.items()}
    _, first = server.aggregate(state, [{k: trained[k] - state[k] for k in state}], None, [None])
    _, second = server.aggregate(state, [{k: trained[k] - state[k] for k in state}], None, [None])

    assert {k.split(".")[1] for k in sent} == {"0", "2", "3", "5"}
    assert first["surrogates"] == {"redistilled": False}
    assert second["surrogates"]["redistilled"] is True
    assert not torch.equal(server.memory["0.up.weight"], before["0.up.weight"])
    assert server.memory_prefix == PREFIX  # checkpointed with the run
    node = method_for(experiment)
    trainable, extras = node.split_received({**server.sendable(state, [1, 4]), **server.extras([1, 4], 6)})
    model, stats = node.assemble(fitted_cache, [1, 4], 7, "cpu", extras)
    assert set(extras) == set(server.extras([1, 4], 6)) and not any(k.startswith(PREFIX) for k in trainable)
    assert torch.equal(model.surrogates["0"].up.weight, server.memory["0.up.weight"])
    assert stats.bytes_read == assemble(fitted_cache, [1, 4], 7)[1].bytes_read  # none read from the file


def test_tuned_surrogates_train_on_the_nodes_and_are_averaged_over_those_that_ran_them(fitted_cache: Path) -> None:
    from torch.utils.data import TensorDataset

    from fedra_core.config import NodeSettings
    from fedra_core.evaluation import GlobalModel
    from fedra_core.local import run_local_round

    experiment = _experiment(fitted_cache, surrogates="tuned")
    server = method_for(experiment)
    state = GlobalModel(fitted_cache, 7, server).initial_state()
    tasks = {0: [1, 4], 1: [0, 4]}  # block 0: run as a surrogate by node 0, held by node 1
    deltas = []
    for node_id, layers in tasks.items():
        sent = {**server.sendable(state, layers), **server.extras(layers, 6)}
        data = TensorDataset(torch.randn(32, 3, 16, 16), torch.arange(32) % 7)
        node = NodeSettings(node_id, 2, 2, None, fitted_cache, "cpu")
        delta = run_local_round(experiment, node, layers, sent, data, 7, server_round=1).delta
        assert set(delta) == set(sent)  # the adapters' and the surrogates' deltas, nothing else
        assert any(delta[k].abs().sum() > 0 for k in delta if k.startswith(f"{PREFIX}2."))
        deltas.append(delta)
    before = {k: v.clone() for k, v in server.memory.items()}

    new_state, info = server.aggregate(state, deltas, None, [None, None])

    assert set(new_state) == set(state)  # the surrogates stay out of the global state
    assert info["surrogates"]["tuned_blocks"] == [0, 1, 2, 3, 5]
    for block, runners in {"0": [0], "2": [0, 1], "1": [1]}.items():
        key = f"{block}.down.weight"
        mean = sum(deltas[i][PREFIX + key] for i in runners) / len(runners)
        assert torch.allclose(server.memory[key], before[key] + mean, atol=1e-6)
    assert torch.equal(server.memory["4.down.weight"], before["4.down.weight"])  # held by both: nobody ran it
    assert server.returns_extras and server.memory_prefix == PREFIX

    poisoned = [{**deltas[0], f"{PREFIX}3.up.bias": torch.full_like(deltas[0][f"{PREFIX}3.up.bias"], 3e38)},
                {**deltas[1], f"{PREFIX}3.up.bias": torch.full_like(deltas[1][f"{PREFIX}3.up.bias"], 3e38)}]
    server.memory["3.up.bias"] = torch.full_like(server.memory["3.up.bias"], 3e38)  # the sum overflows
    kept = server.memory["3.up.bias"].clone()
    _, info = server.aggregate(state, poisoned, None, [None, None])
    assert info["surrogates"]["not_finite_kept"] == [f"{PREFIX}3.up.bias"]
    assert torch.equal(server.memory["3.up.bias"], kept)


def test_a_frozen_node_refuses_surrogates_sent_by_the_server(fitted_cache: Path) -> None:
    method = method_for(_experiment(fitted_cache))
    sent = {f"{PREFIX}0.{k}": v for k, v in Surrogate(32, 8).state_dict().items()}
    with pytest.raises(SurrogateError, match="strategy.surrogates is frozen"):
        method.assemble(fitted_cache, [1, 2, 3, 4, 5], 0, "cpu", sent)


def test_a_folder_of_unlabeled_images_is_proxy_data_and_part_of_the_digest(tiny_vit_cache: Path,
                                                                           tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    cache, folder = _copy(tiny_vit_cache, tmp_path), tmp_path / "proxy" / "any" / "depth"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    recipe = Recipe(images=64, epochs=1, batch_size=16, proxy=str(tmp_path / "proxy"))

    info = ensure_surrogates(cache, recipe)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "new.png")

    assert len(proxy_images(recipe, read_meta(cache))) == 41
    assert surrogate_source(recipe, backbone_identity(cache)) != info["source"]  # another proxy: stale
    with pytest.raises(SurrogateError, match="is not a folder"):
        ensure_surrogates(cache, Recipe(proxy=str(tmp_path / "missing")))


def test_the_command_builds_the_file_for_any_cache(tiny_vit_cache: Path, tmp_path: Path) -> None:
    from fedra_core.surrogates import main

    cache = _copy(tiny_vit_cache, tmp_path)
    main(["build", str(cache), "--rank", "4"])
    assert read_info(cache)["rank"] == "4"
    assert not [p for p in os.listdir(cache) if p.startswith(".")]  # no temporary file left


# ------------------------------------------------------------- a real Flower simulation
ROOT = Path(__file__).resolve().parent.parent


def _simulate(tmp_path: Path, cache: Path, mode: str) -> Path:
    """Two rounds of FedRA with ``mode`` surrogates through deploy/simulate.py; the run folder."""
    import subprocess
    import sys

    import yaml

    values = {"name": f"tiny-{mode}", "seed": 3,
              "backbone": {"cache": str(cache), "lora": {"rank": 2, "alpha": 2, "dropout": 0.0}},
              "data": {"dataset": "builtin-digits", "max_test_per_domain": 40},
              "clients": {"capacities": [2, 2, 2, 2, 2, 2]},
              "strategy": {"method": "fedra", "surrogates": mode, "surrogates_every": 1,
                           "surrogates_images": 256, "surrogates_epochs": 2},  # the machinery, quickly
              "training": {"rounds": 2, "local_steps": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003}}
    experiment = tmp_path / f"{mode}.yaml"
    experiment.write_text(yaml.safe_dump(values))
    command = [sys.executable, str(ROOT / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / f"flwr-{mode}"),
               "-c", f"experiment='{experiment}' output-dir='{tmp_path / 'out'}'"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path / "out" / f"tiny-{mode}"


@pytest.fixture(scope="module")
def runs(tiny_vit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A frozen, a redistill and a tuned run on one copy of the tiny cache, one after the other."""
    tmp_path = tmp_path_factory.mktemp("sim-surrogates")
    cache = _copy(tiny_vit_cache, tmp_path)
    return {mode: _simulate(tmp_path, cache, mode) for mode in ("frozen", "redistill", "tuned")}


def test_the_recipe_follows_the_strategy() -> None:
    from fedra_core.surrogates import recipe_of

    strategy = experiment_from_dict({"strategy": {"surrogates": "frozen", "surrogates_images": 300,
                                                  "surrogates_epochs": 2, "surrogates_rank": 4}}).strategy
    assert recipe_of(strategy) == Recipe(rank=4, images=300, epochs=2)
    assert recipe_of(experiment_from_dict({}).strategy) == Recipe()  # the defaults are the recipe's


def _records(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["frozen", "redistill", "tuned"])
def test_a_simulation_with_surrogates_trains_and_records_them(runs: dict[str, Path], mode: str) -> None:
    import yaml

    config = yaml.safe_load((runs[mode] / "config.yaml").read_text())
    records = _records(runs[mode])

    assert config["strategy"]["surrogates"] == mode
    assert config["run"]["surrogates"]["mode"] == mode
    assert config["run"]["surrogates"]["source"].startswith("surrogates:rank=8:recipe=")
    assert len(config["run"]["surrogates"]["relative_errors"]) == 6
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert all(c["status"] == "ok" for c in record["clients"])
        assert 0.0 <= record["mean_accuracy"] <= 1.0


def test_redistill_refreshes_the_surrogates_and_sends_them(runs: dict[str, Path]) -> None:
    frozen, redistill = _records(runs["frozen"]), _records(runs["redistill"])

    for plain, sent in zip(frozen[1:], redistill[1:]):
        assert sent["aggregation"]["surrogates"]["redistilled"] is True
        assert plain["allocation"] == sent["allocation"]  # the same seed: the same sub-models
        for a, b in zip(plain["clients"], sent["clients"]):  # four skipped blocks' surrogates on top
            assert b["bytes_sent"] > a["bytes_sent"]


def test_tuned_surrogates_come_back_from_the_clients_and_are_averaged(runs: dict[str, Path]) -> None:
    frozen, tuned = _records(runs["frozen"]), _records(runs["tuned"])

    for plain, trained in zip(frozen[1:], tuned[1:]):
        assert plain["allocation"] == trained["allocation"]
        assert trained["aggregation"]["surrogates"]["tuned_blocks"] == list(range(6))  # 6 clients x 4 skipped
        for a, b in zip(plain["clients"], trained["clients"]):  # four skipped blocks' surrogates each way
            assert b["status"] == "ok" and b["bytes_sent"] > a["bytes_sent"]
            assert b["bytes_received"] > a["bytes_received"]


def test_the_probe_evaluates_sub_models_with_and_without_surrogates(runs: dict[str, Path]) -> None:
    from fedra_core import probe

    rows = probe.probe(runs["frozen"], depths=[2, 6], draws=1, surrogates=True)

    assert [r.label for r in rows] == ["all blocks", "first 2", "first 2 + surrogates", "random 2",
                                       "random 2 + surrogates"]
    assert rows[1].layers == rows[2].layers and rows[3].layers == rows[4].layers
    assert "first 2 + surrogates" in probe.probe_table(rows)


def test_the_probe_of_a_tuned_run_uses_the_surrogates_its_server_kept(runs: dict[str, Path]) -> None:
    from fedra_core import probe
    from fedra_core.records import RunOutput
    from fedra_core.surrogates import to_state

    output = RunOutput(runs["tuned"])
    experiment = output.read_config()
    own = probe.run_surrogates(output, experiment)
    from_file = to_state(load_surrogates(experiment.backbone.cache_path, range(6), 8)[0])

    assert {PREFIX + k for k in own if k != "rounds"} == set(from_file)
    assert any(not torch.equal(own[k[len(PREFIX):]], v) for k, v in from_file.items())  # two rounds of tuning
    assert probe.run_surrogates(RunOutput(runs["frozen"]), RunOutput(runs["frozen"]).read_config()) is None
    method = probe.probe_methods(experiment, surrogates=True)[1][1]
    model = probe.GlobalModel(experiment.backbone.cache_path, 10, method, layers=[1, 3],
                              extras=method.stand_ins.to_send(dict(own), [1, 3], 6))
    assert torch.equal(model.model.surrogates["4"].up.weight, own["4.up.weight"])
    rows = probe.probe(runs["tuned"], depths=[2], draws=1, surrogates=True)
    assert [r.label for r in rows] == ["all blocks", "first 2", "first 2 + surrogates", "random 2",
                                       "random 2 + surrogates"]


def test_the_probe_of_a_surrogate_run_also_evaluates_plain_sub_models(fitted_cache: Path) -> None:
    from fedra_core.probe import probe_methods

    run = _experiment(fitted_cache)  # a run that trained with frozen surrogates

    methods = probe_methods(run, surrogates=True)

    assert [(label, m.stand_ins is None) for label, m in methods] == [("", True), (" + surrogates", False)]
    assert [m.stand_ins is None for _, m in probe_methods(run)] == [True]
