"""HeteroTune: DeMA adapters on real timm ViTs of different widths and depths, names, slicing, CMGA, the strategy."""

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedra_core.aggregation import masked_average
from fedra_core.backbone import assemble, import_timm, write_cache
from fedra_core.config import ConfigError, experiment_from_dict
from fedra_core.evaluation import GlobalModel
from fedra_core.hetero import SEPARATOR, cmga_aggregate, slot_of
from fedra_core.methods import method_for
from flower_messages import StaticGrid, run_identity  # noqa: F401 - autouse fixture
from server_app.strategy import FedRA

NUM_CLASSES = 5
ARCHS = {  # name: (embed_dim, depth, heads)
    "s": (16, 4, 2),
    "m": (32, 6, 2),
    "l": (48, 6, 4),
}


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny ViT caches of different widths and depths, each recording its own source."""
    timm = import_timm()
    root = tmp_path_factory.mktemp("family")
    caches = {}
    for name, (dim, depth, heads) in ARCHS.items():
        kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": dim, "depth": depth, "num_heads": heads,
                  "mlp_ratio": 2.0}
        with torch.random.fork_rng():
            torch.manual_seed(len(name) + dim)
            model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **kwargs)
        caches[name] = root / name
        write_cache(model, "vit_tiny_patch16_224", kwargs, caches[name], source=f"test:{name}")
    return caches


def _experiment(family: dict[str, Path], method: str = "hetero", input_hidden: int = 0,
                **strategy: object):  # noqa: ANN202
    return experiment_from_dict({
        "seed": 2,
        "backbone": {"architectures": [{"name": n, "cache": str(c)} for n, c in family.items()],
                     "adapter": {"rank": 4, "experts": 3, "slots": 2, "input_hidden": input_hidden}},
        "clients": {"capacities": [4, 2, 6, 3, 6, 6], "architectures": ["s", "s", "m", "m", "l", "l"]},
        "strategy": {"method": method, **strategy},
        "training": {"local_steps": 2, "batch_size": 8},
    })


def _model(family: dict[str, Path], arch: str, method: str = "hetero", layers: list[int] | None = None,
           input_hidden: int = 0):  # noqa: ANN202
    return GlobalModel(family[arch], NUM_CLASSES, method_for(_experiment(family, method, input_hidden)),
                       layers=layers, architecture=arch)


def test_slots_follow_relative_depth() -> None:
    assert [slot_of(b, 8, 4) for b in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [slot_of(b, 12, 4) for b in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_architectures_share_only_the_cores_and_the_shared_head(family: dict[str, Path]) -> None:
    small, large = _model(family, "s").initial_state(), _model(family, "l").initial_state()
    shared_s = {k for k in small if SEPARATOR not in k}
    shared_l = {k for k in large if SEPARATOR not in k}
    assert shared_s == shared_l and shared_s  # the same slots (2), experts (3) and the shared head
    assert {k.split(".")[1] for k in shared_s} == {"slot0", "slot1", "head"}
    for key in shared_s:  # drawn from the run's seed alone: the same start in every architecture
        torch.testing.assert_close(small[key], large[key])
    assert all(k.startswith("s/") for k in set(small) - shared_s)
    assert all(k.startswith("l/") for k in set(large) - shared_l)
    assert small["s/blocks.0.adapter.down.weight"].shape == (4, 16)  # private: the width of the architecture
    assert large["l/blocks.0.adapter.down.weight"].shape == (4, 48)
    assert small["dema.slot0.experts.0.weight"].shape == (4, 4)  # shared: the fixed space
    isolated = _model(family, "s", "isolated").initial_state()
    assert all(k.startswith("s/") for k in isolated)  # nothing shared without cross-model sharing


def test_adapters_start_as_identity_and_train_only_their_parts(family: dict[str, Path]) -> None:
    model = _model(family, "m")
    images = torch.randn(3, 3, 16, 16)
    plain, _ = assemble(family["m"], None, NUM_CLASSES, "cpu")
    with torch.no_grad():
        features = model.model.forward_head(model.model.forward_features(images), pre_logits=True)
        reference = plain.forward_head(plain.forward_features(images), pre_logits=True)
    torch.testing.assert_close(features, reference)  # up-projections start at zero
    trainable = {k for k, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter" in k or k.startswith(("dema.", "head.")) for k in trainable)


def test_the_input_adapter_is_shared_starts_as_identity_and_trains(family: dict[str, Path]) -> None:
    small, large = _model(family, "s", input_hidden=6), _model(family, "l", input_hidden=6)
    keys = {k for k in small.initial_state() if k.startswith("dema.input.")}
    assert keys == {f"dema.input.{c}.{p}" for c in ("inner", "outer") for p in ("weight", "bias")}
    assert keys <= set(large.initial_state())  # one tensor for every architecture
    torch.testing.assert_close(small.initial_state()["dema.input.inner.weight"],
                               large.initial_state()["dema.input.inner.weight"])
    plain = _model(family, "s")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small.model.forward_features(images), plain.model.forward_features(images))
        small.model.dema["input"].outer.weight.fill_(0.1)  # identity at the start, and in the path:
        assert not torch.allclose(small.model.forward_features(images), plain.model.forward_features(images))
    isolated = _model(family, "s", "isolated", input_hidden=6).initial_state()
    assert "s/dema.input.inner.weight" in isolated  # private without cross-model sharing
    sent = method_for(_experiment(family, input_hidden=6)).sendable(
        {**small.initial_state(), **large.initial_state()}, [0], "s", 4)
    assert keys <= set(sent)  # every client, whatever blocks it holds


def test_a_client_is_sent_its_blocks_its_slots_and_nothing_of_another_architecture(family: dict[str, Path]) -> None:
    experiment = _experiment(family)
    method = method_for(experiment)
    state = {}
    for arch in ARCHS:
        state.update(_model(family, arch).initial_state())
    sent = method.sendable(state, [0, 1], "m", 6)  # blocks 0, 1 of 6: slot 0 only
    assert {k.split(".")[1] for k in sent if k.startswith("dema.slot")} == {"slot0"}
    assert all(k.startswith(("m/", "dema.")) for k in sent)
    assert {k.split(".")[1] for k in sent if k.startswith("m/blocks.")} == {"0", "1"}
    assert "m/head.private.weight" in sent and "dema.head.weight" in sent
    sub = _model(family, "m", layers=[0, 1])
    assert set(sub.initial_state()) == set(sent)  # exactly what the sub-model trains
    sub.load(sent)


def test_cmga_removes_the_conflicting_component_and_counts_it() -> None:
    base = {"dema.slot0.w": torch.zeros(2), "a/head": torch.zeros(1), "b/head": torch.zeros(1)}
    deltas = [{"dema.slot0.w": torch.tensor([1.0, 0.0]), "a/head": torch.ones(1)},
              {"dema.slot0.w": torch.tensor([-1.0, 1.0]), "b/head": torch.ones(1) * 3}]
    state, info = cmga_aggregate(base, deltas, None, ["a", "b"])
    # a's [1, 0] loses its component along b's [-1, 1]: [0.5, 0.5]; b's loses its along a's: [0, 1]
    torch.testing.assert_close(state["dema.slot0.w"], torch.tensor([0.25, 0.75]))
    assert info["conflicts"] == 1 and info["resolved"] == 2 and info["pairs"] == 1 and info["tensors"] == 1
    assert info["mean_cosine"] == pytest.approx(-1 / 2 ** 0.5)
    assert state["a/head"].item() == 1.0 and state["b/head"].item() == 3.0  # private: each its own clients


def test_cmga_without_conflicts_is_the_plain_mean() -> None:
    base = {"dema.w": torch.zeros(3), "a/x": torch.zeros(1)}
    deltas = [{"dema.w": torch.tensor([1.0, 2.0, 0.0]), "a/x": torch.ones(1)},
              {"dema.w": torch.tensor([3.0, 0.0, 1.0])}, {"dema.w": torch.tensor([1.0, 1.0, 1.0])}]
    state, info = cmga_aggregate(base, deltas, [1.0, 2.0, 1.0], ["a", "b", "b"])
    expected = masked_average(base, deltas, [1.0, 2.0, 1.0])
    for key in base:
        torch.testing.assert_close(state[key], expected[key])
    assert info["conflicts"] == 0 and info["resolved"] == 0


def _declare(node_id: int, partition: int, source: str, layers: int) -> Message:
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id, message_type="query")
    capacity = MetricRecord({"max-layers": layers, "partition-id": partition, "num-partitions": 6,
                             "num-examples": 10, "backbone-layers": layers})
    reply = Message(RecordDict({"capacity": capacity, "node": ConfigRecord({"domain": f"d{partition}",
                                                                            "backbone-source": source})}),
                    reply_to=query)
    return reply


def test_strategy_maps_nodes_to_architectures_and_allocates_inside_each(family: dict[str, Path]) -> None:
    experiment = _experiment(family)
    strategy = FedRA(experiment, 6, np.random.default_rng(0),
                     architectures={"s": ("test:s", 4), "m": ("test:m", 6), "l": ("test:l", 6)})
    info = strategy._node_info(7, _declare(7, 0, "test:s", 4))
    assert (info.architecture, info.depth, info.max_layers) == ("s", 4, 4)
    with pytest.raises(Exception, match="none of the experiment's architectures"):
        strategy._node_info(8, _declare(8, 1, "builtin:digits-vit:other", 12))
    with pytest.raises(Exception, match="has 6"):
        strategy._node_info(9, _declare(9, 2, "test:m", 12))
    matrix = method_for(experiment).allocate([4, 2, 3], [4, 4, 6], np.random.default_rng(1))
    assert matrix.shape == (3, 6) and matrix.sum(axis=1).tolist() == [4, 2, 3]
    assert not matrix[:2, 4:].any()  # a 4-block backbone holds no block beyond its depth


def test_strategy_sends_the_architecture_and_aggregates_with_cmga(family: dict[str, Path]) -> None:
    experiment = _experiment(family)
    sources = {"s": ("test:s", 4), "m": ("test:m", 6), "l": ("test:l", 6)}
    strategy = FedRA(experiment, 6, np.random.default_rng(0), architectures=sources)
    ids = [100 + i for i in range(6)]
    archs = experiment.clients.architectures
    strategy.nodes = {n: strategy._node_info(n, _declare(n, i, sources[archs[i]][0], sources[archs[i]][1]))
                      for i, n in enumerate(ids)}
    state = {}
    for arch in ARCHS:
        state.update(_model(family, arch).initial_state())
    messages = list(strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), StaticGrid(ids)))
    assert [m.content["config"]["architecture"] for m in messages] == list(archs)
    replies = []
    for i, message in enumerate(messages):
        sent = message.content["arrays"].to_torch_state_dict()
        assert all(k.startswith((archs[i] + "/", "dema.")) for k in sent)
        sign = 1.0 if archs[i] == "s" else -1.0  # the phones pull the shared parts against the others
        replies.append(Message(RecordDict({"arrays": ArrayRecord({k: torch.full_like(v, sign) for k, v in sent.items()}),
                                           "metrics": MetricRecord({"num-examples": 8})}), reply_to=message))
    new_state, _ = strategy.aggregate_train(1, replies)
    cmga = strategy.last_record["aggregation"]["cmga"]
    assert cmga["conflicts"] > 0 and cmga["resolved"] > 0
    assert {row["architecture"] for row in strategy.last_record["rows"]} == {"s", "m", "l"}
    assert set(new_state.to_torch_state_dict()) == set(state)


def test_experiments_that_cannot_mix_architectures_are_refused(family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="clients.architectures"):
        experiment_from_dict({"backbone": {"architectures": [{"name": "s", "cache": "/x"}]},
                              "strategy": {"method": "hetero"}})
    with pytest.raises(ConfigError, match="only hetero, isolated and hetero-largest"):
        experiment_from_dict({"backbone": {"architectures": [{"name": "s", "cache": "/x"}]},
                              "clients": {"capacities": [1], "architectures": ["s"]}})
    with pytest.raises(ConfigError, match=r"clients.architectures\[1\]"):
        experiment_from_dict({"backbone": {"architectures": [{"name": "s", "cache": "/x"}]},
                              "clients": {"capacities": [1, 1], "architectures": ["s", "xl"]},
                              "strategy": {"method": "hetero"}})
    with pytest.raises(ConfigError, match="distinct cache"):
        experiment_from_dict({"backbone": {"architectures": [{"name": "s", "cache": "/x"}, {"name": "m", "cache": "/x"}]},
                              "clients": {"capacities": [1], "architectures": ["s"]}, "strategy": {"method": "hetero"}})


def _write_digit(path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[3:13, 7:9] = 255  # a "1"
    Image.fromarray(pixels).save(path)


def test_simulation_tunes_three_architectures_together(family: dict[str, Path], tmp_path: Path) -> None:
    """A real Flower simulation (deploy/simulate.py): every architecture evaluated on every domain, bytes by architecture."""
    import json
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parent.parent
    values = _experiment(family).to_dict()
    values.update({"name": "hetero-tiny", "data": {"dataset": "builtin-digits", "max_test_per_domain": 30,
                                                   "proxy_fraction": 0.05},
                   "training": {**values["training"], "rounds": 2, "optimizer": "adamw", "lr": 0.003}})
    values["strategy"].update(distill_steps=2, distill_batch_size=8, distill_teacher="capacity")  # end to end
    path = tmp_path / "hetero.yaml"
    path.write_text(yaml.safe_dump(values))
    command = [sys.executable, str(root / "deploy" / "simulate.py"), "--flwr-home", str(tmp_path / "flwr-home"),
               "-c", f"experiment='{path}' output-dir='{tmp_path / 'out'}'"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "out" / "hetero-tiny"
    records = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for record in records:
        assert set(record["architectures"]) == {"s", "m", "l"}
        for per_arch in record["architectures"].values():
            assert len(per_arch["accuracy"]) == 6  # every domain
    trained = records[-1]
    assert [c["architecture"] for c in trained["clients"]] == ["s", "s", "m", "m", "l", "l"]
    assert all(c["status"] == "ok" for c in trained["clients"])
    assert trained["aggregation"]["cmga"]["tensors"] > 0
    distilled = trained["distill"]
    assert distilled["steps"] == 2 and distilled["proxy_images"] > 0 and set(distilled["architectures"]) == set(ARCHS)
    sent = {c["architecture"]: c["bytes_sent"] for c in trained["clients"]}
    assert sent["s"] < sent["m"] < sent["l"]  # wider backbones and more blocks held: more bytes
    table = (run / "results.md").read_text()
    assert "round 2, s" in table and "bytes sent per client per round" in table
    assert (run / "architectures.png").stat().st_size > 0
    from fedra_core.compare import report

    compared = report([run], tmp_path / "compared")  # the comparison's table per architecture
    assert "| s (final) | s (last 5) |" in compared and "| hetero |" in compared
    from fedra_core.predict import PredictError, predict

    image = tmp_path / "digit.png"
    _write_digit(image)
    for arch in ("s", "l"):  # a phone and a workstation each run their own tuned model
        result = predict(run, [image], architecture=arch, top_k=3)
        assert result.mode == "in-memory" and result.model_blocks == ARCHS[arch][1]
        assert len(result.predictions[0].top) == 3
    with pytest.raises(PredictError, match="name the one this node runs"):
        predict(run, [image])


def test_local_tls_cluster_runs_three_architectures(family: dict[str, Path], tmp_path: Path) -> None:
    """deploy/local_cluster.py: a SuperLink with TLS and three SuperNodes, each on its own architecture's cache."""
    import json
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parent.parent
    values = _experiment(family).to_dict()
    values.update({"name": "hetero-cluster",
                   "data": {"dataset": "builtin-digits", "domains": ["clean", "inverted", "sketch"],
                            "max_test_per_domain": 30},
                   "clients": {"capacities": [4, 6, 6], "architectures": ["s", "m", "l"]},
                   "training": {**values["training"], "rounds": 2, "optimizer": "adamw", "lr": 0.003}})
    path = tmp_path / "hetero.yaml"
    path.write_text(yaml.safe_dump(values))
    command = [sys.executable, str(root / "deploy" / "local_cluster.py"), "--workdir", str(tmp_path / "cluster"),
               "--no-proxy", "--max-layers", "2,3,6",
               "-c", f"experiment='{path}' output-dir='{tmp_path / 'out'}'"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1800,
                            start_new_session=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "hetero-cluster" / "rounds.jsonl").read_text()
               .splitlines()]
    last = records[-1]
    assert last["round"] == 2 and set(last["architectures"]) == {"s", "m", "l"}
    clients = sorted(last["clients"], key=lambda c: c["partition_id"])
    assert [(c["architecture"], len(c["layers"]), c["status"]) for c in clients] == \
        [("s", 2, "ok"), ("m", 3, "ok"), ("l", 6, "ok")]  # each node's own max-layers, inside its own backbone


def test_preflight_names_a_capacity_beyond_its_own_architecture(family: dict[str, Path]) -> None:
    from fedra_core.preflight import PreflightError, check_experiment

    values = _experiment(family).to_dict()
    values["clients"]["capacities"] = [5, 2, 6, 3, 6, 6]  # s has 4 blocks
    with pytest.raises(PreflightError, match=r"clients.capacities\[0\] = 5 is outside 1..4 .*architecture 's'"):
        check_experiment(experiment_from_dict(values))
    with pytest.raises(PreflightError, match=r"node-2 = 7 is outside 1..6 .*architecture 'm'"):
        check_experiment(_experiment(family), node_capacities=[4, 4, 7])
    values = _experiment(family).to_dict()
    values["backbone"]["adapter"]["slots"] = 5
    with pytest.raises(PreflightError, match="slots = 5 exceeds"):
        check_experiment(experiment_from_dict(values))


def _distiller(family: dict[str, Path], teacher: str = "mean"):  # noqa: ANN202
    from torch.utils.data import TensorDataset

    from fedra_core.crossdistill import CrossDistiller

    values = _experiment(family).to_dict()
    values["data"]["proxy_fraction"] = 0.1
    values["strategy"].update(distill_steps=15, distill_batch_size=8, distill_lr=0.01, distill_teacher=teacher)
    experiment = experiment_from_dict(values)
    method = method_for(experiment)
    models = {a: GlobalModel(family[a], NUM_CLASSES, method, architecture=a) for a in family}
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    proxy = {a: TensorDataset(images, torch.zeros(24, dtype=torch.long)) for a in family}
    state = {}
    for model in models.values():
        state.update(model.initial_state())
    generator = torch.Generator().manual_seed(6)
    for key in state:  # heads and up-projections away from their start, so the architectures disagree
        if SEPARATOR in key:
            state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=generator)
    depths = {a: d for a, (_, d, _) in ARCHS.items()}
    capacities = {a: float(w * d) for a, (w, d, _) in ARCHS.items()}
    return CrossDistiller(models, method, depths, proxy, experiment.strategy, experiment.seed, 16,
                          capacities=capacities), state


def test_cross_distillation_moves_only_private_tensors_towards_the_ensemble(family: dict[str, Path]) -> None:
    distill, state = _distiller(family)
    before = {k: v.clone() for k, v in state.items()}

    new_state, info = distill(state, 3)

    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is not changed
    assert set(new_state) == set(state)
    shared = [k for k in state if SEPARATOR not in k]
    assert shared and all(torch.equal(new_state[k], state[k]) for k in shared)
    for arch in family:
        private = [k for k in state if k.startswith(arch + SEPARATOR)]
        assert any(not torch.equal(new_state[k], state[k]) for k in private), arch
        moved = info["architectures"][arch]
        assert moved["after"]["kl"] < moved["before"]["kl"], (arch, moved)
    assert info["steps"] == 15 and info["proxy_images"] == 24 and info["teacher"] == "mean"
    again, _ = distill(state, 3)  # the same round draws the same batches: a resumed run repeats it
    assert all(torch.equal(again[k], new_state[k]) for k in state)
    other, _ = distill(state, 4)
    assert any(not torch.equal(other[k], new_state[k]) for k in state)


def test_the_confidence_teacher_follows_the_surer_architecture(family: dict[str, Path]) -> None:
    distill, _ = _distiller(family, teacher="confidence")
    sure = torch.tensor([[8.0, 0.0, 0.0, 0.0, 0.0]])  # ~0.99 on class 0
    unsure = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.0]])  # ~0.24 on class 1
    target = distill.teacher({"s": unsure, "m": unsure, "l": sure})
    assert target.argmax().item() == 0  # two unsure votes lose to one sure one
    distill.settings = _experiment(family, distill_teacher="mean").strategy  # the two unsure votes dominate
    assert distill.teacher({"s": unsure, "m": unsure, "l": sure})[0, 1] > target[0, 1]


def test_distillation_settings_are_checked(family: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"data.proxy_fraction.*> 0 with strategy.distill_steps"):
        _experiment(family, distill_steps=5)
    with pytest.raises(ConfigError, match=r"strategy.distill_steps.*0 for strategy.method 'fedra'"):
        experiment_from_dict({"strategy": {"distill_steps": 5}})
    with pytest.raises(ConfigError, match=r"strategy.distill_teacher.*one of"):
        experiment_from_dict({"strategy": {"distill_teacher": "max"}})
    from fedra_core.crossdistill import CrossDistiller

    method = method_for(_experiment(family))
    with pytest.raises(ValueError, match="same images for every architecture"):
        CrossDistiller({"s": None, "l": None}, method, {"s": 4, "l": 6},  # type: ignore[dict-item]
                       {"s": [0] * 3, "l": [0] * 4}, _experiment(family).strategy, 0)  # type: ignore[dict-item]


def test_the_capacity_teacher_weighs_architectures_by_width_times_depth(family: dict[str, Path]) -> None:
    distill, _ = _distiller(family, teacher="capacity")
    assert distill.capacities == {"s": 16 * 4, "m": 32 * 6, "l": 48 * 6}  # the family's width x depth
    votes = {a: torch.nn.functional.one_hot(torch.tensor([i]), NUM_CLASSES).float() * 50 for i, a in enumerate(ARCHS)}
    target = distill.teacher(votes)[0]  # each architecture sure of another class
    assert torch.allclose(target[:3], torch.tensor([64.0, 192.0, 288.0]) / 544, atol=1e-4)
    from fedra_core.crossdistill import CrossDistiller

    with pytest.raises(ValueError, match="positive capacity per architecture"):
        CrossDistiller(distill.models, distill.method, distill.depths, distill.proxy, distill.settings, 0)
