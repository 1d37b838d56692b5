"""The predict command on a finished run: streamed and in-memory agree, JSON parses, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fedra_core.backbone import read_meta
from fedra_core.capacity import MB, backbone_sizes
from fedra_core.config import experiment_from_dict
from fedra_core.data import DIGIT_CLASSES
from fedra_core.evaluation import GlobalModel
from fedra_core.predict import main
from fedra_core.records import RunOutput


def _write_run(run_dir: Path, cache: Path, data: dict, num_classes: int) -> Path:
    """A finished run as ``ServerRun`` leaves it: config.yaml with the backbone's source, adapters."""
    experiment = experiment_from_dict({
        "name": "tiny", "seed": 5, "data": data, "clients": {"capacities": [6, 2]},
        "backbone": {"cache": str(cache), "lora": {"rank": 4, "alpha": 8, "target_modules": ["attn.proj", "mlp.fc2"]}},
    })
    meta = read_meta(cache)
    initial = GlobalModel.with_lora(cache, num_classes, experiment.backbone.lora, seed=experiment.seed).initial_state()
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in initial.items()}  # adapters that matter
    output = RunOutput(run_dir)
    output.write_config(experiment, {"backbone": meta.timm_name, "num_layers": meta.num_layers,
                                     "backbone_source": meta.source})
    output.save_adapters(state, {"backbone": meta.timm_name, "method": "fedra", "rounds": "1"})
    return run_dir


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)  # not square: centre crop
        paths.append(folder / f"image{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def finished_run(tiny_vit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run on the built-in digits (10 classes) and a folder of three PNG images."""
    base = tmp_path_factory.mktemp("predict")
    run = _write_run(base / "run", tiny_vit_cache, {"dataset": "builtin-digits"}, len(DIGIT_CLASSES))
    _write_images(base / "images", 3)
    return run, base / "images"


def _predict_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    main([*args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_streamed_and_in_memory_give_the_same_top_k(finished_run: tuple, capsys: pytest.CaptureFixture) -> None:
    # Prepare
    run, images = finished_run
    files = [str(p) for p in sorted(images.iterdir())]

    # Execute: a node holding 2 of the 6 blocks, and one holding them all
    streamed = _predict_json(capsys, str(run), *files, "--max-layers", "2", "--top-k", "3")
    in_memory = _predict_json(capsys, str(run), *files, "--top-k", "3")

    # Assert
    assert (streamed["mode"], streamed["model_blocks"], streamed["node_blocks"]) == ("streamed", 6, 2)
    assert (in_memory["mode"], in_memory["node_blocks"]) == ("in-memory", None)
    assert [p["image"] for p in streamed["predictions"]] == files
    for a, b in zip(streamed["predictions"], in_memory["predictions"]):
        assert [c["class"] for c in a["top_k"]] == [c["class"] for c in b["top_k"]]
        assert [c["probability"] for c in a["top_k"]] == pytest.approx([c["probability"] for c in b["top_k"]],
                                                                       abs=1e-5)
        assert all(c["class"] == DIGIT_CLASSES[c["label"]] for c in a["top_k"])
        probabilities = [c["probability"] for c in a["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6


def test_a_memory_budget_streams_and_a_folder_gives_its_images(finished_run: tuple, tiny_vit_cache: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run, images = finished_run
    budget = backbone_sizes(tiny_vit_cache).bytes_for(3) / MB * 1.001  # the shared parts and 3 blocks

    main([str(run), str(images), "--memory-budget-mb", f"{budget:.6f}", "--top-k", "2"])
    lines = capsys.readouterr().out.strip().splitlines()

    assert lines[0] == "# 6-block global model, streamed block by block; the node holds 3"
    assert [line.split(":")[0] for line in lines[1:]] == [str(p) for p in sorted(images.iterdir())]
    assert all(line.count("%)") == 2 for line in lines[1:])


def test_a_folder_dataset_names_its_classes(tiny_vit_cache: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    # Prepare: a run on root/<domain>/<class>/ images: its classes are the class folders
    root = tmp_path / "data"
    for domain in ("day", "night"):
        for name in ("cat", "dog"):
            _write_images(root / domain / name, 2)
    run = _write_run(tmp_path / "run", tiny_vit_cache, {"dataset": "folder", "root": str(root)}, 2)
    image = root / "day" / "cat" / "image0.png"

    result = _predict_json(capsys, str(run), str(image), "--max-layers", "4")

    assert {c["class"] for c in result["predictions"][0]["top_k"]} == {"cat", "dog"}
    moved = _predict_json(capsys, str(run), str(image), "--data-root", str(tmp_path / "elsewhere"))
    assert {c["class"] for c in moved["predictions"][0]["top_k"]} == {"class_0", "class_1"}  # data not here


def _other_source(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "other-source"
    copy.mkdir()
    values = yaml.safe_load((run / "config.yaml").read_text())
    values["run"]["backbone_source"] = "timm:some-other-weights"
    (copy / "config.yaml").write_text(yaml.safe_dump(values))
    (copy / "adapters.safetensors").write_bytes((run / "adapters.safetensors").read_bytes())
    return copy


def test_clear_errors_with_exit_code_2(finished_run: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, images = finished_run
    image = str(sorted(images.iterdir())[0])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = {
        "is not a run folder": [str(tmp_path / "no-run"), image],
        "no backbone cache": [str(run), image, "--backbone-cache", str(tmp_path / "no-cache")],
        "cannot decode image file": [str(run), str(broken)],
        "image not found": [str(run), str(tmp_path / "missing.png")],
        "was tuned on the backbone": [str(_other_source(run, tmp_path)), image],
        "cannot hold one block": [str(run), image, "--memory-budget-mb", "0.001"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, expected
        assert expected in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "no-run").exists()  # reading a run never creates its folder
