"""Image-file datasets: a folder-per-domain loader and the DomainNet and NICO++ split-file loaders."""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fedra_core.data.builtin import DomainData

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DOMAINNET_DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NICOPP_DOMAINS: tuple[str, ...] = ("autumn", "dim", "grass", "outdoor", "rock", "water")

_CROP_SCALE = (0.8, 1.0)  # random resized crop: fraction of the image area kept
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # random resized crop: aspect ratio range
_CROP_TRIES = 10


class ImageFileDataset(Dataset):
    """Images decoded from files on access; labels known without decoding.

    Evaluation: the shorter side is resized to ``image_size`` and the centre square
    kept. Training: a random resized crop (area scale 0.8-1, aspect 3/4-4/3) resized
    to ``image_size`` and a random horizontal flip, drawn from ``generator`` (torch's
    default generator when None, which DataLoader workers seed independently).

    Parameters
    ----------
    paths : sequence of Path
        Image files.
    labels : sequence of int
        Label of each file.
    image_size : int
        Side of the square output images.
    mean, std : sequence of float
        Per-channel normalization, three values each.
    train : bool
        Whether to apply the random training augmentation.
    generator : torch.Generator or None
        Source of the augmentation's randomness.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"got {len(paths)} paths but {len(labels)} labels")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.paths = tuple(Path(p) for p in paths)
        self._labels = np.array(labels, dtype=np.int64)  # a copy: freezing must not touch the caller's array
        self._labels.setflags(write=False)
        self.image_size = int(image_size)
        self.mean, self.std = _check_normalization(mean, std)
        self.train = train
        self.generator = generator

    @property
    def train_labels(self) -> np.ndarray:
        """(N,) int64 labels in order, read-only."""
        return self._labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _open_rgb(self.paths[index], self.image_size)
        box = self._random_box(image.size) if self.train else _center_box(image.size)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        if self.train and torch.rand(1, generator=self.generator).item() < 0.5:
            pixels = pixels.flip(-1)
        return (pixels - self.mean) / self.std, int(self._labels[index])

    def _random_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """Crop box (left, top, right, bottom) of a random resized crop, as torchvision's RandomResizedCrop."""
        width, height = size
        log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
        for _ in range(_CROP_TRIES):
            draws = torch.rand(4, generator=self.generator).tolist()
            area = width * height * (_CROP_SCALE[0] + (_CROP_SCALE[1] - _CROP_SCALE[0]) * draws[0])
            ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
            crop_w, crop_h = math.sqrt(area * ratio), math.sqrt(area / ratio)
            if crop_w <= width and crop_h <= height:
                left, top = (width - crop_w) * draws[2], (height - crop_h) * draws[3]
                return left, top, left + crop_w, top + crop_h
        return _center_box(size)


def _check_normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate three-channel mean/std and return them as (3, 1, 1) tensors."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got mean={list(mean)} std={list(std)}")
    if min(std) <= 0:
        raise ValueError(f"std values must be positive, got {list(std)}")
    return torch.tensor(mean, dtype=torch.float32)[:, None, None], torch.tensor(std, dtype=torch.float32)[:, None, None]


def _open_rgb(path: Path, image_size: int) -> Image.Image:
    """Decode an image file as RGB, letting JPEG decode at a reduced size that is still >= image_size."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (image_size, image_size))
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot decode image file {path}: {error}") from error


def _center_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred square of side min(width, height): resize-shorter-side then centre-crop in one step."""
    width, height = size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


# ------------------------------------------------------------------ folder per domain


def _list_images(class_dir: Path) -> list[Path]:
    images = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"class folder {class_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def _list_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_domain(domain_dir: Path) -> dict[str, list[Path]]:
    """Map each class folder name of a domain to its sorted image files."""
    if not domain_dir.is_dir():
        raise FileNotFoundError(f"domain folder not found: {domain_dir}")
    class_dirs = _list_dirs(domain_dir)
    if not class_dirs:
        raise ValueError(f"domain folder {domain_dir} holds no class folders")
    return {class_dir.name: _list_images(class_dir) for class_dir in class_dirs}


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (train, test) per label; a class of two or more images keeps one on each side."""
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclass(frozen=True)
class _Entries:
    """Image files and labels of one split of one domain."""

    paths: list[Path]
    labels: list[int]


def _select(paths: list[Path], labels: np.ndarray, positions: np.ndarray) -> _Entries:
    return _Entries([paths[i] for i in positions], labels[positions].tolist())


def _domain_data(
    name: str,
    train: _Entries,
    test: _Entries,
    classes: tuple[str, ...],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> DomainData:
    train_set = ImageFileDataset(train.paths, train.labels, image_size, mean, std, train=True)
    test_set = ImageFileDataset(test.paths, test.labels, image_size, mean, std, train=False)
    return DomainData(name, train_set, test_set, train_set.train_labels, classes)


def load_image_folder_domains(
    root: Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    test_fraction: float = 0.2,
    seed: int = 0,
    domains: Sequence[str] | None = None,
) -> list[DomainData]:
    """Load ``root/<domain>/<class>/<image>`` as one DomainData per domain (split by seed).

    The label space is the sorted union of the class folder names of the loaded
    domains; a class may be absent from some domains. Each domain is split per class
    into train and test from ``seed`` and the domain's name, so the split of a domain
    does not depend on which other domains are loaded. Images are decoded on access; a
    file that cannot be decoded raises ``ValueError`` naming it at that point.

    Parameters
    ----------
    root : Path
        Folder holding one subfolder per domain.
    image_size : int
        Side of the square output images.
    mean, std : sequence of float
        Per-channel normalization (e.g. the backbone's).
    test_fraction : float
        Fraction of each class of each domain held out for testing, in (0, 1).
    seed : int
        Seed of the train/test split.
    domains : sequence of str or None
        Domain folder names to load, in this order; all subfolders (sorted) when None.

    Returns
    -------
    list of DomainData
        One per domain, in the order of ``domains``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root not found: {root}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    names = list(domains) if domains is not None else [p.name for p in _list_dirs(root)]
    if not names:
        raise ValueError(f"image folder root {root} holds no domain folders")
    scans = {name: _scan_domain(root / name) for name in names}
    classes = tuple(sorted(set().union(*scans.values())))
    index = {name: label for label, name in enumerate(classes)}
    result = []
    for name, scan in scans.items():
        paths = [path for class_name in scan for path in scan[class_name]]
        labels = np.asarray([index[class_name] for class_name in scan for _ in scan[class_name]], dtype=np.int64)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        train_pos, test_pos = _stratified_split(labels, test_fraction, rng)
        train, test = _select(paths, labels, train_pos), _select(paths, labels, test_pos)
        result.append(_domain_data(name, train, test, classes, image_size, mean, std))
        logger.info("domain %s: %d train, %d test images", name, len(train_pos), len(test_pos))
    return result


# ------------------------------------------------------------------ split-file datasets


def read_split_file(path: Path) -> list[tuple[str, int]]:
    """Read a split file whose lines are ``<relative path> <label>``.

    Parameters
    ----------
    path : Path
        The split file; blank lines are skipped and the path may contain spaces.

    Returns
    -------
    list of (str, int)
        Relative image path and label per line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    entries = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.strip().rsplit(maxsplit=1)
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(f"{path} line {number}: expected '<relative path> <label>', got {line.strip()!r}")
            entries.append((fields[0], int(fields[1])))
    return entries


def _split_entries(
    root: Path, domain: str, split: str, keep: Callable[[int], bool]
) -> tuple[_Entries, dict[int, str]]:
    """Read ``root/<domain>_<split>.txt``, keep the labels ``keep`` accepts, check each image exists.

    Returns the entries and the class name (the image's parent folder) of each label seen.
    """
    split_file = root / f"{domain}_{split}.txt"
    entries = _Entries([], [])
    names: dict[int, str] = {}
    for relative, label in read_split_file(split_file):
        if not keep(label):
            continue
        image = root / relative
        if not image.is_file():
            raise FileNotFoundError(f"image file {image} listed in {split_file} not found")
        entries.paths.append(image)
        entries.labels.append(label)
        class_name = PurePosixPath(relative).parent.name
        if names.setdefault(label, class_name) != class_name:
            raise ValueError(f"{split_file}: label {label} is used for folders {names[label]!r} and {class_name!r}")
    if not entries.paths:
        raise ValueError(f"split file {split_file} lists no images with a label in the label space")
    return entries, names


def _class_names(names_by_file: dict[str, dict[int, str]], num_classes: int) -> tuple[str, ...]:
    """Name labels 0..num_classes-1 from the folders seen; the same label must keep one name."""
    names: dict[int, str] = {}
    for source, found in names_by_file.items():
        for label, name in found.items():
            if names.setdefault(label, name) != name:
                raise ValueError(f"label {label} is class {names[label]!r} elsewhere but {name!r} in {source}")
    missing = [label for label in range(num_classes) if label not in names]
    if missing:
        logger.warning("labels %s appear in no split file; naming them class_<label>", missing[:10])
    return tuple(names.get(label, f"class_{label}") for label in range(num_classes))


def _load_split_domains(
    root: Path,
    domains: Sequence[str],
    keep: Callable[[int], bool],
) -> tuple[dict[str, tuple[_Entries, _Entries]], dict[str, dict[int, str]]]:
    """Read the train and test split files of every domain."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    splits, names = {}, {}
    for domain in domains:
        train, names[f"{domain}_train.txt"] = _split_entries(root, domain, "train", keep)
        test, names[f"{domain}_test.txt"] = _split_entries(root, domain, "test", keep)
        splits[domain] = (train, test)
        logger.info("domain %s: %d train, %d test images", domain, len(train.paths), len(test.paths))
    return splits, names


def load_domainnet(
    root: Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int = 100,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
) -> list[DomainData]:
    """Load DomainNet from its official layout and split files, keeping the first ``num_classes`` labels.

    Layout: images ``root/<domain>/<class>/<file>.jpg`` and split files
    ``root/<domain>_train.txt`` and ``root/<domain>_test.txt`` whose lines are
    ``<domain>/<class>/<file>.jpg <label>``. The FedRA paper uses the first 100 classes.

    Parameters
    ----------
    root : Path
        DomainNet root folder.
    image_size : int
        Side of the square output images.
    mean, std : sequence of float
        Per-channel normalization (e.g. the backbone's).
    num_classes : int
        Keep images whose label is below this.
    domains : sequence of str
        Domains to load, in this order.

    Returns
    -------
    list of DomainData
        One per domain; classes named after the class folders.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    splits, names = _load_split_domains(root, domains, lambda label: label < num_classes)
    seen = max(label for found in names.values() for label in found) + 1
    classes = _class_names(names, min(num_classes, seen))
    return [_domain_data(d, *splits[d], classes, image_size, mean, std) for d in domains]


def load_nicopp(
    root: Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    domains: Sequence[str] = NICOPP_DOMAINS,
) -> list[DomainData]:
    """Load NICO++ (common contexts) from split files, one DomainData per context.

    Layout: images ``root/<context>/<class>/<file>`` and split files
    ``root/<context>_train.txt`` and ``root/<context>_test.txt`` whose lines are
    ``<context>/<class>/<file> <label>`` (paths relative to ``root``, as DomainNet's).
    The label space is 0..max label over all loaded split files; each class is named
    after the folder holding its images.

    Parameters
    ----------
    root : Path
        NICO++ root folder.
    image_size : int
        Side of the square output images.
    mean, std : sequence of float
        Per-channel normalization (e.g. the backbone's).
    domains : sequence of str
        Contexts to load, in this order.

    Returns
    -------
    list of DomainData
        One per context.
    """
    splits, names = _load_split_domains(root, domains, lambda label: True)
    num_classes = max(label for found in names.values() for label in found) + 1
    classes = _class_names(names, num_classes)
    return [_domain_data(d, *splits[d], classes, image_size, mean, std) for d in domains]
