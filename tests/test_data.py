"""Tests of fedra_core.data: built-in benchmark, synthetic shapes, folder loaders and partitioning."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fedra_core.data import (
    BUILTIN_DOMAINS,
    SHAPE_CLASSES,
    ClientShard,
    DomainData,
    builtin_digits,
    load_domainnet,
    load_image_folder_domains,
    load_nicopp,
    partition_dirichlet,
    partition_feature_skew,
    save_builtin_preview,
    shard_dataset,
    stratified_subset,
    synthetic_shapes,
)
from fedra_core.data.builtin import _builtin_digits_cached

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# ----------------------------------------------------------------- built-in digits


def test_builtin_digits_has_six_domains_of_normalized_images() -> None:
    domains = builtin_digits(image_size=24)

    image, label = domains[0].train[0]

    assert [d.name for d in domains] == list(BUILTIN_DOMAINS) and len(domains) == 6
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    for domain in domains:
        assert domain.classes == tuple(str(d) for d in range(10))
        assert set(np.unique(domain.train_labels)) == set(range(10))
        assert domain.train_labels.dtype == np.int64 and len(domain.train_labels) == len(domain.train)
        assert torch.equal(domain.train.labels, torch.tensor(domain.train_labels))
        assert domain.train.images.min() >= -1.0 and domain.train.images.max() <= 1.0


def test_builtin_digits_is_deterministic_per_seed() -> None:
    first = _builtin_digits_cached.__wrapped__(16, 3, 0.2)  # bypass the cache

    again = _builtin_digits_cached.__wrapped__(16, 3, 0.2)
    other = _builtin_digits_cached.__wrapped__(16, 4, 0.2)

    for a, b, c in zip(first, again, other):
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
        assert not torch.equal(a.train.images, c.train.images)


def test_builtin_digits_no_test_digit_is_trained_on_in_any_domain() -> None:
    domains = builtin_digits()

    train_digits = set(np.concatenate([d.train.source_indices for d in domains]).tolist())
    test_digits = set(np.concatenate([d.test.source_indices for d in domains]).tolist())

    assert not train_digits & test_digits
    assert len(train_digits | test_digits) == 1797
    assert abs(len(test_digits) / 1797 - 0.2) < 0.01


def test_builtin_domains_differ_in_style() -> None:
    domains = builtin_digits()

    def style(domain: DomainData) -> np.ndarray:
        x = domain.train.images * 0.5 + 0.5  # (N, 3, H, W) in [0, 1]
        brightness = x.mean()
        colourfulness = (x - x.mean(1, keepdim=True)).abs().mean()
        edges = (x[..., 1:] - x[..., :-1]).abs().mean()
        return np.array([brightness, colourfulness, edges])

    stats = {d.name: style(d) for d in domains}

    for a, b in itertools.combinations(stats, 2):
        assert np.abs(stats[a] - stats[b]).max() > 0.05, f"{a} and {b} look alike"


def test_builtin_datasets_hand_out_copies() -> None:
    domain = builtin_digits()[0]
    before = domain.train.images[0].clone()

    image, _ = domain.train[0]
    image.fill_(7.0)

    assert torch.equal(domain.train.images[0], before)
    assert not domain.train_labels.flags.writeable


def test_builtin_digits_rejects_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        builtin_digits(test_fraction=1.0)


def test_save_builtin_preview_writes_a_png(tmp_path: Path) -> None:
    domains = builtin_digits()

    path = save_builtin_preview(domains, tmp_path / "docs" / "preview.png", samples_per_domain=3)

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100


# ---------------------------------------------------------------- synthetic shapes


def test_synthetic_shapes_classes_are_balanced_and_finite() -> None:
    n_classes = len(SHAPE_CLASSES)

    dataset = synthetic_shapes(10 * n_classes + 3, image_size=20, seed=0)

    counts = np.bincount(dataset.labels.numpy(), minlength=n_classes)
    assert n_classes >= 16 and dataset.classes == SHAPE_CLASSES
    assert dataset.images.shape == (10 * n_classes + 3, 3, 20, 20)
    assert counts.min() >= 10 and counts.max() <= 11
    assert torch.isfinite(dataset.images).all()


def test_synthetic_shapes_is_deterministic_per_seed() -> None:
    first = synthetic_shapes(64, seed=1)

    again = synthetic_shapes(64, seed=1)
    other = synthetic_shapes(64, seed=2)

    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


# ------------------------------------------------------------------ image folders


def _write_png(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)


def _folder_tree(root: Path) -> None:
    """Domain a: cat (5), dog (5); domain b: cat (5), bird (5)."""
    for domain, classes in {"a": ("cat", "dog"), "b": ("bird", "cat")}.items():
        for label, name in enumerate(classes):
            for i in range(5):
                _write_png(root / domain / name / f"{i}.png", 40 * label + i)


def test_image_folder_domains_labels_and_split(tmp_path: Path) -> None:
    _folder_tree(tmp_path)

    domains = load_image_folder_domains(tmp_path, 8, MEAN, STD, test_fraction=0.4, seed=0)

    a, b = domains
    assert [a.name, b.name] == ["a", "b"] and a.classes == ("bird", "cat", "dog") == b.classes
    assert sorted(set(a.train_labels)) == [1, 2] and sorted(set(b.train_labels)) == [0, 1]
    assert len(a.train) == 6 and len(a.test) == 4
    assert not set(a.train.paths) & set(a.test.paths)
    assert set(a.train.paths) | set(a.test.paths) == set((tmp_path / "a").rglob("*.png"))


def test_image_folder_split_is_deterministic_and_independent_of_other_domains(tmp_path: Path) -> None:
    _folder_tree(tmp_path)

    both = load_image_folder_domains(tmp_path, 8, MEAN, STD, seed=5)
    only_b = load_image_folder_domains(tmp_path, 8, MEAN, STD, seed=5, domains=["b"])

    assert both[1].test.paths == only_b[0].test.paths


def test_image_file_dataset_yields_normalized_square_images(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    domain = load_image_folder_domains(tmp_path, 8, MEAN, STD, domains=["a"])[0]

    train_image, _ = domain.train[0]
    test_image, test_label = domain.test[0]

    assert train_image.shape == test_image.shape == (3, 8, 8)
    expected_red = (Image.open(domain.test.paths[0]).getpixel((0, 0))[0] / 255 - 0.5) / 0.25
    assert torch.allclose(test_image[0], torch.full((8, 8), expected_red), atol=1e-5)
    assert test_label == domain.test.train_labels[0]


def test_image_folder_missing_root_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_folder_domains(tmp_path / "nowhere", 8, MEAN, STD)


def test_image_folder_empty_class_folder_is_named(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    (tmp_path / "b" / "fish").mkdir()

    with pytest.raises(ValueError, match="fish"):
        load_image_folder_domains(tmp_path, 8, MEAN, STD)


def test_image_folder_corrupt_image_is_named_when_decoded(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    (tmp_path / "a" / "cat" / "0.png").write_bytes(b"not a png")
    domain = load_image_folder_domains(tmp_path, 8, MEAN, STD, domains=["a"])[0]
    dataset = domain.train if (tmp_path / "a" / "cat" / "0.png") in domain.train.paths else domain.test
    position = dataset.paths.index(tmp_path / "a" / "cat" / "0.png")

    with pytest.raises(ValueError, match="0.png"):
        dataset[position]


# ------------------------------------------------------- DomainNet and NICO++ splits


def _split_tree(root: Path, domains: tuple[str, ...], classes: tuple[str, ...]) -> None:
    """Official-style layout: root/<domain>/<class>/<file>.jpg plus root/<domain>_{train,test}.txt."""
    for domain in domains:
        for split, count in (("train", 3), ("test", 1)):
            lines = []
            for label, name in enumerate(classes):
                for i in range(count):
                    relative = f"{domain}/{name}/{domain}_{split}_{i}.jpg"
                    _write_png(root / relative, 30 * label)
                    lines.append(f"{relative} {label}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_keeps_the_first_classes(tmp_path: Path) -> None:
    _split_tree(tmp_path, ("clipart", "sketch"), ("apple", "bee", "cat", "dog"))

    domains = load_domainnet(tmp_path, 8, MEAN, STD, num_classes=2, domains=("clipart", "sketch"))

    assert [d.name for d in domains] == ["clipart", "sketch"]
    assert domains[0].classes == ("apple", "bee")
    assert len(domains[0].train) == 6 and len(domains[1].test) == 2
    assert set(domains[1].train_labels) == {0, 1}
    assert domains[0].test[0][0].shape == (3, 8, 8)


def test_domainnet_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    _split_tree(tmp_path, ("clipart",), ("apple", "bee"))
    split_file = tmp_path / "clipart_train.txt"
    lines = split_file.read_text().splitlines()
    lines[2] = "clipart/apple/clipart_train_0.jpg two"
    split_file.write_text("\n".join(lines))

    with pytest.raises(ValueError, match=r"clipart_train\.txt line 3"):
        load_domainnet(tmp_path, 8, MEAN, STD, domains=("clipart",))


def test_domainnet_missing_split_file_and_image_are_named(tmp_path: Path) -> None:
    _split_tree(tmp_path, ("clipart", "real"), ("apple",))
    (tmp_path / "real_test.txt").unlink()
    (tmp_path / "clipart" / "apple" / "clipart_train_1.jpg").unlink()

    with pytest.raises(FileNotFoundError, match="real_test.txt"):
        load_domainnet(tmp_path, 8, MEAN, STD, domains=("real",))
    with pytest.raises(FileNotFoundError, match="clipart_train_1.jpg"):
        load_domainnet(tmp_path, 8, MEAN, STD, domains=("clipart",))


def test_nicopp_label_space_and_class_names_come_from_split_files(tmp_path: Path) -> None:
    _split_tree(tmp_path, ("autumn", "dim"), ("bear", "bird", "car"))

    domains = load_nicopp(tmp_path, 8, MEAN, STD, domains=("autumn", "dim"))

    assert [d.name for d in domains] == ["autumn", "dim"]
    assert domains[0].classes == ("bear", "bird", "car") == domains[1].classes
    assert len(domains[1].train) == 9 and len(domains[1].test) == 3


# -------------------------------------------------------------------- partitioning


def _labelled_domain(name: str, labels: np.ndarray) -> DomainData:
    """A domain whose train set holds only labels (partitioning never decodes images)."""
    targets = torch.from_numpy(labels.astype(np.int64))
    dataset = TensorDataset(torch.zeros(len(labels), 1), targets)
    return DomainData(name, dataset, dataset, labels.astype(np.int64), tuple(str(c) for c in range(10)))


def _domains() -> list[DomainData]:
    rng = np.random.default_rng(0)
    return [_labelled_domain("a", rng.integers(0, 10, 1000)), _labelled_domain("b", rng.integers(0, 10, 503))]


def _mean_label_entropy(shards: list[ClientShard], domains: list[DomainData]) -> float:
    entropies = []
    for shard in shards:
        p = np.bincount(domains[shard.domain].train_labels[shard.indices], minlength=10) / len(shard.indices)
        entropies.append(-(p[p > 0] * np.log(p[p > 0])).sum())
    return float(np.mean(entropies))


def test_feature_skew_covers_each_domain_exactly_once() -> None:
    domains = _domains()

    shards = partition_feature_skew(domains, 4, np.random.default_rng(0))

    assert [s.domain for s in shards] == [0] * 4 + [1] * 4
    for position, domain in enumerate(domains):
        parts = [s.indices for s in shards if s.domain == position]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(domain.train_labels)))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_sizes_sum_to_domain_and_respect_minimum() -> None:
    domains = _domains()

    shards = partition_dirichlet(domains, 5, alpha=0.5, min_samples=20, rng=np.random.default_rng(0))

    assert [s.domain for s in shards] == [0] * 5 + [1] * 5
    for position, domain in enumerate(domains):
        parts = [s.indices for s in shards if s.domain == position]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(domain.train_labels)))
        assert min(map(len, parts)) >= 20


def test_dirichlet_label_skew_grows_as_alpha_shrinks() -> None:
    domains = _domains()

    skewed = partition_dirichlet(domains, 5, alpha=0.1, min_samples=1, rng=np.random.default_rng(0))
    mild = partition_dirichlet(domains, 5, alpha=100.0, min_samples=1, rng=np.random.default_rng(0))

    assert _mean_label_entropy(skewed, domains) < _mean_label_entropy(mild, domains) - 0.5


def test_dirichlet_is_deterministic_for_a_generator_state() -> None:
    domains = _domains()

    first = partition_dirichlet(domains, 3, 0.5, 10, np.random.default_rng(7))
    again = partition_dirichlet(domains, 3, 0.5, 10, np.random.default_rng(7))

    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(first, again))


def test_dirichlet_impossible_minimum_is_a_clear_error() -> None:
    domains = _domains()

    with pytest.raises(ValueError, match="min_samples=150 is too large for domain 'b'"):
        partition_dirichlet(domains, 5, alpha=0.5, min_samples=150, rng=np.random.default_rng(0))


@pytest.mark.parametrize(("clients", "alpha"), [(0, 0.5), (2, 0.0), (2, -1.0)])
def test_partition_rejects_bad_arguments(clients: int, alpha: float) -> None:
    domains = _domains()

    with pytest.raises(ValueError, match="clients_per_domain|alpha"):
        partition_dirichlet(domains, clients, alpha=alpha, min_samples=1, rng=np.random.default_rng(0))
    if clients < 1:
        with pytest.raises(ValueError, match="clients_per_domain"):
            partition_feature_skew(domains, clients, np.random.default_rng(0))


def test_shard_dataset_selects_the_shard_items() -> None:
    domains = _domains()
    shard = partition_feature_skew(domains, 2, np.random.default_rng(0))[3]

    subset = shard_dataset(domains, shard)

    assert len(subset) == len(shard.indices)
    assert int(subset[0][1]) == domains[1].train_labels[shard.indices[0]]


# ------------------------------------------------------------ capped test sets


def test_stratified_subset_keeps_every_class_in_proportion() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])  # sorted by class, as files listed class by class

    picked = stratified_subset(labels, 10, np.random.default_rng(0))

    assert len(picked) == 10 and list(picked) == sorted(set(picked))
    assert np.bincount(labels[picked]).tolist() == [5, 3, 2]
    assert np.bincount(labels[stratified_subset(labels, 7, np.random.default_rng(0))]).tolist() == [4, 2, 1]
    assert len(stratified_subset(labels, 500, np.random.default_rng(0))) == 100


def test_capped_folder_test_set_holds_every_class(tmp_path: Path) -> None:
    from fedra_core.backbone import CacheMeta
    from fedra_core.config import experiment_from_dict
    from fedra_core.datasets import test_sets

    for label, name in enumerate(("ant", "bee", "cat", "dog")):
        for i in range(6):
            _write_png(tmp_path / "a" / name / f"{i}.png", 40 * label + i)
    experiment = experiment_from_dict({"data": {"dataset": "folder", "root": str(tmp_path), "test_fraction": 0.5,
                                                "max_test_per_domain": 8}, "clients": {"capacities": [2]}})
    meta = CacheMeta("vit", {}, 2, 8, MEAN, STD)

    sets, num_classes = test_sets(experiment, meta)
    labels = [label for _, label in sets["a"]]

    assert num_classes == 4 and len(labels) == 8
    assert sorted(labels) == [0, 0, 1, 1, 2, 2, 3, 3]  # the first 8 items would be classes 0-2 only
    assert sets["a"].indices == test_sets(experiment, meta)[0]["a"].indices  # the same for every method
    assert all(d.test_shuffled for d in builtin_digits(image_size=12))  # its first N are random already


def test_proxy_images_are_held_back_from_every_client() -> None:
    """data.proxy_fraction: the server's unlabeled images are in no client's shard; 0 leaves the shards alone."""
    from fedra_core.backbone import CacheMeta
    from fedra_core.config import NodeSettings, experiment_from_dict
    from fedra_core.datasets import client_data, proxy_sets

    meta = CacheMeta("vit", {}, 2, 12, (0.5,) * 3, (0.5,) * 3)

    def shards(values: dict) -> tuple[list[set[int]], dict]:
        experiment = experiment_from_dict({"data": {"dataset": "builtin-digits", **values},
                                           "clients": {"capacities": [2] * 12}})
        nodes = [NodeSettings(p, 12, 2, None, Path("/unused"), "cpu") for p in range(12)]
        return [set(client_data(experiment, n, meta).train.indices) for n in nodes], proxy_sets(experiment, meta)

    for partitioning in ("feature", "feature-label"):
        settings = {"partitioning": partitioning, "clients_per_domain": 2}
        plain, none = shards(settings)
        held, proxy = shards({**settings, "proxy_fraction": 0.1})
        assert all(len(p) == 0 for p in none.values())
        for domain_index, (name, images) in enumerate(proxy.items()):
            kept = set(images.indices)
            train = images.dataset
            assert abs(len(kept) - 0.1 * len(train)) <= 1
            labels = [train[i][1] for i in images.indices]
            assert len(set(labels)) == 10  # every class, in proportion
            for shard in (2 * domain_index, 2 * domain_index + 1):
                assert not kept & held[shard]  # no client trains on a proxy image
                assert held[shard] == plain[shard] - kept  # and loses nothing else
    from fedra_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.proxy_fraction.*in \[0, 0.5\]"):
        experiment_from_dict({"data": {"proxy_fraction": 0.6}})


def test_test_renderings_draw_the_same_test_digits_again() -> None:
    """data.test_renderings: N x the test images, the first rendering the test set as before, the same digits."""
    from fedra_core.backbone import CacheMeta
    from fedra_core.config import ConfigError, NodeSettings, experiment_from_dict
    from fedra_core.datasets import client_data, test_sets

    meta = CacheMeta("vit", {}, 2, 12, (0.5,) * 3, (0.5,) * 3)

    def experiment(renderings: int, cap: int | None = 40):
        return experiment_from_dict({"data": {"dataset": "builtin-digits", "domains": ["clean", "sketch"],
                                              "max_test_per_domain": cap, "test_renderings": renderings},
                                     "clients": {"capacities": [2, 2]}})

    plain, _ = test_sets(experiment(1), meta)
    three, _ = test_sets(experiment(3), meta)
    for name in ("clean", "sketch"):
        assert len(plain[name]) == 40 and len(three[name]) == 120
        images = torch.stack([image for image, _ in three[name]]).view(3, 40, -1)
        labels = [label for _, label in three[name]]
        assert torch.equal(images[0], torch.stack([image for image, _ in plain[name]]).view(40, -1))  # as before
        assert labels == [label for _, label in plain[name]] * 3  # the same digits, in the same order
        assert not torch.equal(images[1], images[0]) and not torch.equal(images[2], images[1])  # drawn again
    again, _ = test_sets(experiment(3), meta)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again["sketch"], three["sketch"]))  # the same on every call
    node = NodeSettings(1, 12, 2, None, Path("/unused"), "cpu")
    own = client_data(experiment(3), node, meta).test  # a node's own evaluation: the server's items
    assert len(own) == 120 and all(torch.equal(a[0], b[0]) for a, b in zip(own, three["sketch"]))
    uncapped, _ = test_sets(experiment(2, cap=None), meta)
    whole = builtin_digits(image_size=12)[0].test
    assert len(uncapped["clean"]) == 2 * len(whole)
    test_digits = set(np.asarray(whole.source_indices).tolist())
    train_digits = set(np.asarray(builtin_digits(image_size=12)[0].train.source_indices).tolist())
    assert not test_digits & train_digits
    with pytest.raises(ConfigError, match="data.test_renderings"):
        experiment(0)
    with pytest.raises(ConfigError, match="data.test_renderings.*builtin-digits"):
        experiment_from_dict({"data": {"dataset": "folder", "root": "/x", "test_renderings": 2}})
