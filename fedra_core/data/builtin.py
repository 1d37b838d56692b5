"""Built-in offline data: a six-style digits benchmark and a synthetic shapes pretraining set."""

from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

logger = logging.getLogger(__name__)

BUILTIN_DOMAINS: tuple[str, ...] = ("clean", "inverted", "noisy", "color", "texture", "sketch")
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
BUILTIN_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
BUILTIN_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

_PHOTO_SCALE = 4  # photos are downscaled to this many times the image size, then cropped
_SHAPES_CHUNK = 4096  # synthetic images rendered at once, to bound peak memory


@dataclass(frozen=True)
class DomainData:
    """One domain of a benchmark: its train and test sets over a shared label space.

    Attributes
    ----------
    name : str
        Domain name.
    train, test : torch.utils.data.Dataset
        Yield ``(image, label)``: a normalized float tensor (3, H, W) and an int.
    train_labels : numpy.ndarray
        (n_train,) int64 labels of ``train`` in order, readable without decoding images.
    classes : tuple of str
        Label space, shared by all domains of a benchmark.
    test_shuffled : bool
        Whether ``test`` is in a seeded random order, so that its first N items are
        already a random subset; otherwise (files listed class by class) a capped
        test set is drawn stratified (``fedra_core.datasets.test_sets``).
    """

    name: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    classes: tuple[str, ...]
    test_shuffled: bool = False


class ImageTensorDataset(TensorDataset):
    """In-memory images (N, 3, H, W) and int64 labels (N,); items are copies, so callers cannot alter it.

    Parameters
    ----------
    images : torch.Tensor
        (N, 3, H, W) float32, already normalized.
    labels : torch.Tensor
        (N,) int64.
    classes : tuple of str
        Names of the labels.
    source_indices : numpy.ndarray or None
        (N,) index of the source sample each image was made from (the digit index for
        the built-in benchmark), or None.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: tuple[str, ...] = (),
        source_indices: np.ndarray | None = None,
    ) -> None:
        super().__init__(images, labels)
        self.classes = tuple(classes)
        self.source_indices = None if source_indices is None else _read_only(source_indices)

    @property
    def images(self) -> torch.Tensor:
        """All images, (N, 3, H, W); treat as read-only (the benchmark is cached)."""
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """All labels, (N,) int64; treat as read-only."""
        return self.tensors[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:  # type: ignore[override]
        return self.tensors[0][index].clone(), int(self.tensors[1][index])


# --------------------------------------------------------------------------- helpers


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


def _normalize(rgb: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) in [0, 1] -> (N, 3, H, W) float32 normalized with BUILTIN_MEAN/STD."""
    mean = np.asarray(BUILTIN_MEAN, dtype=np.float32)
    std = np.asarray(BUILTIN_STD, dtype=np.float32)
    out = (np.clip(rgb, 0.0, 1.0).astype(np.float32) - mean) / std  # (N, H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))  # (N, 3, H, W)


@functools.lru_cache(maxsize=4)
def _sample_photos(height: int) -> np.ndarray:
    """scikit-learn's bundled photos (china, flower) downscaled to ``height``: (P, height, W, 3) in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = []
    for photo in load_sample_images().images:  # (427, 640, 3) uint8 each
        width = round(photo.shape[1] * height / photo.shape[0])
        small = Image.fromarray(photo).resize((width, height), Image.Resampling.BILINEAR)
        photos.append(np.asarray(small, dtype=np.float32) / 255.0)
    return _read_only(np.stack(photos))


def _random_crops(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random (optionally mirrored) crops of the sample photos: (n, size, size, 3) in [0, 1]."""
    photos = _sample_photos(_PHOTO_SCALE * size)  # (P, Hp, Wp, 3)
    which = rng.integers(0, photos.shape[0], n)
    y0 = rng.integers(0, photos.shape[1] - size + 1, n)
    x0 = rng.integers(0, photos.shape[2] - size + 1, n)
    flip = rng.random(n) < 0.5
    steps = np.arange(size)
    ys = y0[:, None] + steps[None, :]  # (n, size)
    xs = np.where(flip[:, None], x0[:, None] + size - 1 - steps, x0[:, None] + steps)  # (n, size)
    return photos[which[:, None, None], ys[:, :, None], xs[:, None, :]]  # (n, size, size, 3)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) perceived brightness."""
    return rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting_colors(background: np.ndarray, rng: np.random.Generator, min_gap: float = 0.3) -> np.ndarray:
    """Random colours (n, 3) whose luminance differs from ``background`` (n, 3) by at least ``min_gap``."""
    colors = rng.random((len(background), 3), dtype=np.float32)
    bg_lum = _luminance(background)
    low = np.abs(_luminance(colors) - bg_lum) < min_gap  # (n,)
    dark = rng.uniform(0.0, 0.25, (len(background), 3)).astype(np.float32)
    light = rng.uniform(0.75, 1.0, (len(background), 3)).astype(np.float32)
    replacement = np.where((bg_lum > 0.5)[:, None], dark, light)
    return np.where(low[:, None], replacement, colors)


def _blend(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Alpha-blend: background, foreground (n, S, S, 3) or (n, 1, 1, 3); mask (n, S, S) -> (n, S, S, 3)."""
    alpha = mask[..., None]  # (n, S, S, 1)
    return background * (1.0 - alpha) + foreground * alpha


# ---------------------------------------------------------------- digits benchmark


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _split_digit_indices(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of digit indices into (train, test), shared by all domains."""
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _render_digits(digits: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Upscale (n, 8, 8) digits to (n, size, size) masks with random scale, shift and rotation."""
    n = len(digits)
    scale = rng.uniform(0.75, 1.0, n)  # fraction of the canvas the 8x8 frame covers
    angle = np.deg2rad(rng.uniform(-12.0, 12.0, n))
    shift = rng.uniform(-0.12, 0.12, (n, 2))  # in [-1, 1] canvas units
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack(
        [np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1
    ).astype(np.float32)  # (n, 2, 3): canvas coordinates -> digit coordinates
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, size, size], align_corners=False)
    source = torch.from_numpy(digits)[:, None]  # (n, 1, 8, 8)
    masks = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return np.clip(masks[:, 0].numpy(), 0.0, 1.0)  # (n, size, size)


def _style_clean(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light grey digit on black."""
    level = rng.uniform(0.8, 1.0, (len(mask), 1, 1, 1)).astype(np.float32)
    return np.repeat(mask[..., None], 3, axis=-1) * level


def _style_inverted(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark digit on a light grey background."""
    n = len(mask)
    paper = rng.uniform(0.7, 1.0, (n, 1, 1, 1)).astype(np.float32)
    ink = rng.uniform(0.0, 0.2, (n, 1, 1, 1)).astype(np.float32)
    return np.repeat(_blend(paper, ink, mask)[..., :1], 3, axis=-1)


def _style_noisy(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low-contrast grey digit under strong Gaussian and salt-and-pepper noise."""
    n, size = len(mask), mask.shape[1]
    contrast = rng.uniform(0.55, 0.85, (n, 1, 1)).astype(np.float32)
    base = 0.15 + contrast * mask
    sigma = rng.uniform(0.2, 0.35, (n, 1, 1)).astype(np.float32)
    grey = base + sigma * rng.standard_normal((n, size, size), dtype=np.float32)
    salt = rng.random((n, size, size), dtype=np.float32)
    grey = np.where(salt < 0.05, 0.0, np.where(salt > 0.95, 1.0, grey))
    return np.repeat(grey[..., None], 3, axis=-1)


def _style_color(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random foreground colour on a random, contrasting background colour."""
    background = rng.random((len(mask), 3), dtype=np.float32)
    foreground = _contrasting_colors(background, rng, min_gap=0.3)
    return _blend(background[:, None, None], foreground[:, None, None], mask)


def _style_texture(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Digit in black or white over a random crop of a photo."""
    crops = _random_crops(len(mask), mask.shape[1], rng)  # (n, S, S, 3)
    light_bg = _luminance(crops.mean(axis=(1, 2))) > 0.5  # (n,)
    foreground = np.where(light_bg, 0.0, 1.0).astype(np.float32)[:, None, None, None]
    return _blend(crops, foreground, 0.9 * mask)


def _style_sketch(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin dark pen outline of the digit on slightly noisy off-white paper."""
    n, size = len(mask), mask.shape[1]
    solid = torch.from_numpy((mask > 0.45).astype(np.float32))[:, None]  # (n, 1, S, S)
    grown = F.max_pool2d(solid, kernel_size=3, stride=1, padding=1)
    outline = (grown - solid)[:, 0].numpy()  # (n, S, S), 1-pixel contour outside the stroke
    paper = rng.uniform(0.85, 1.0, (n, 1, 1, 3)).astype(np.float32)
    paper = paper + 0.03 * rng.standard_normal((n, size, size, 1), dtype=np.float32)
    ink = rng.uniform(0.0, 0.35, (n, 1, 1, 3)).astype(np.float32)
    return _blend(paper, ink, outline * rng.uniform(0.7, 1.0, (n, 1, 1)).astype(np.float32))


_STYLES: types.MappingProxyType[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = (
    types.MappingProxyType(
        {
            "clean": _style_clean,
            "inverted": _style_inverted,
            "noisy": _style_noisy,
            "color": _style_color,
            "texture": _style_texture,
            "sketch": _style_sketch,
        }
    )
)


def _make_domain(
    name: str,
    digits: np.ndarray,
    labels: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    image_size: int,
    rng: np.random.Generator,
) -> DomainData:
    """Render one domain: its own permutation of the shared split, its own jitter, its style."""
    train_idx, test_idx = rng.permutation(split[0]), rng.permutation(split[1])
    order = np.concatenate([train_idx, test_idx])
    rgb = _STYLES[name](_render_digits(digits[order], image_size, rng), rng)  # (n, S, S, 3)
    images = _normalize(rgb)  # (n, 3, S, S)
    targets = torch.from_numpy(labels[order])
    n_train = len(train_idx)
    train = ImageTensorDataset(images[:n_train], targets[:n_train], DIGIT_CLASSES, train_idx)
    test = ImageTensorDataset(images[n_train:], targets[n_train:], DIGIT_CLASSES, test_idx)
    return DomainData(name, train, test, _read_only(labels[train_idx]), DIGIT_CLASSES, test_shuffled=True)


@functools.lru_cache(maxsize=8)
def _builtin_digits_cached(image_size: int, seed: int, test_fraction: float) -> tuple[DomainData, ...]:
    digits, labels = _load_digits()
    seeds = np.random.SeedSequence(seed).spawn(1 + len(BUILTIN_DOMAINS))
    split = _split_digit_indices(labels, test_fraction, np.random.default_rng(seeds[0]))
    return tuple(
        _make_domain(name, digits, labels, split, image_size, np.random.default_rng(domain_seed))
        for name, domain_seed in zip(BUILTIN_DOMAINS, seeds[1:])
    )


def builtin_digits(image_size: int = 24, seed: int = 0, test_fraction: float = 0.2) -> list[DomainData]:
    """Build the offline six-domain digits benchmark (feature skew: same digits, different styles).

    The 1,797 8x8 digits bundled with scikit-learn are split once, stratified by class,
    into train and test digit indices shared by all domains (no digit used for testing
    is trained on in any domain). Each domain renders every digit of the split in its
    own random order with its own scale/shift/rotation jitter, then applies its style:
    ``clean`` (grey on black), ``inverted`` (dark on light grey), ``noisy`` (low
    contrast under Gaussian and salt-and-pepper noise), ``color`` (random contrasting
    colours), ``texture`` (black or white digit over crops of scikit-learn's sample
    photos) and ``sketch`` (thin pen outline on paper). Results are cached per argument
    tuple; the datasets hand out copies, so the cache cannot be altered through them.

    Parameters
    ----------
    image_size : int
        Side of the square output images, at least 8.
    seed : int
        Seed of the split, the jitter and the styles.
    test_fraction : float
        Fraction of each digit class held out for testing, in (0, 1).

    Returns
    -------
    list of DomainData
        One per name in ``BUILTIN_DOMAINS``, in that order; images (3, S, S) normalized
        with mean 0.5 and std 0.5 per channel; classes ``"0"`` .. ``"9"``.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    domains = _builtin_digits_cached(int(image_size), int(seed), float(test_fraction))
    logger.debug("built-in digits: %d domains of %d train images", len(domains), len(domains[0].train_labels))
    return list(domains)


@functools.lru_cache(maxsize=8)
def _extra_renderings_cached(image_size: int, seed: int, test_fraction: float, rendering: int
                             ) -> tuple[ImageTensorDataset, ...]:
    domains = _builtin_digits_cached(image_size, seed, test_fraction)
    digits, labels = _load_digits()
    out = []
    for index, domain in enumerate(domains):
        order = np.asarray(domain.test.source_indices)
        rng = np.random.default_rng([seed, index, rendering, 104729])  # apart from the domain's own stream
        rgb = _STYLES[domain.name](_render_digits(digits[order], image_size, rng), rng)
        out.append(ImageTensorDataset(_normalize(rgb), torch.from_numpy(labels[order]), DIGIT_CLASSES, order))
    return tuple(out)


def builtin_test_rendering(image_size: int, seed: int, test_fraction: float, rendering: int) -> list[Dataset]:
    """Another rendering of every domain's test digits (``data.test_renderings``): the same digits in
    the same order as ``builtin_digits``' test sets, drawn again with the domain's jitter and style.

    ``rendering`` 0 is the test set itself; 1, 2, ... are new, each its own seeded draw,
    the same for every method and machine. A digit never becomes a training digit: only
    its image changes, so the evaluation stays on held-out digits."""
    if rendering < 0:
        raise ValueError(f"rendering must be >= 0, got {rendering}")
    if rendering == 0:
        return [d.test for d in builtin_digits(image_size, seed, test_fraction)]
    return list(_extra_renderings_cached(int(image_size), int(seed), float(test_fraction), int(rendering)))


def save_builtin_preview(domains: Sequence[DomainData], path: Path, samples_per_domain: int = 8) -> Path:
    """Save a PNG grid with the first training images of each domain, one row per domain.

    Parameters
    ----------
    domains : sequence of DomainData
        Domains whose train sets yield images normalized with ``BUILTIN_MEAN``/``BUILTIN_STD``.
    path : Path
        Output PNG file; its parent folder is created.
    samples_per_domain : int
        Images per row.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(
        len(domains), samples_per_domain, figsize=(1.1 * samples_per_domain + 1.2, 1.1 * len(domains)), squeeze=False
    )
    mean = torch.tensor(BUILTIN_MEAN)[:, None, None]
    std = torch.tensor(BUILTIN_STD)[:, None, None]
    for row, domain in zip(axes, domains):
        for column, axis in enumerate(row):
            image, label = domain.train[column]
            axis.imshow((image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())  # (S, S, 3)
            axis.set_title(domain.classes[label], fontsize=7, pad=2)
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(domain.name, rotation=0, ha="right", va="center", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------------------ synthetic shapes


class _Params(NamedTuple):
    """Per-image geometry, each (n, 1, 1) in pixels."""

    radius: np.ndarray  # shape size (circumradius)
    stroke: np.ndarray  # width of outlines, lines and waves
    period: np.ndarray  # spacing of stripes, checks and dots
    window: np.ndarray  # half side of the square patch holding a periodic pattern


_SIZES = ((0.2, 0.36), (0.05, 0.11), (0.16, 0.26), (0.25, 0.5))  # ranges of _Params, in image sides


def _window(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    """Square patch that bounds the periodic patterns."""
    return np.maximum(np.abs(u), np.abs(v)) - p.window


def _stripes(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return np.maximum(np.abs(np.mod(v, p.period) - p.period / 2) - p.period / 4, _window(u, v, p))


def _checkerboard(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    cells = np.sin(np.pi * u / p.period) * np.sin(np.pi * v / p.period)
    return np.maximum(-cells * p.period / np.pi, _window(u, v, p))


def _dot_grid(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    du, dv = np.mod(u, p.period) - p.period / 2, np.mod(v, p.period) - p.period / 2
    return np.maximum(np.hypot(du, dv) - 0.28 * p.period, _window(u, v, p))


def _box(u: np.ndarray, v: np.ndarray, half: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) - half


def _triangle(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    """Upward-pointing equilateral triangle (image y grows downwards) of circumradius ``radius``."""
    normals = np.deg2rad([90.0, 210.0, 330.0])
    edges = [u * np.cos(a) + v * np.sin(a) for a in normals]
    return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - p.radius / 2


def _plus(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    arm = 0.3 * p.radius
    return np.minimum(
        np.maximum(np.abs(u) - arm, np.abs(v) - p.radius), np.maximum(np.abs(v) - arm, np.abs(u) - p.radius)
    )


def _l_shape(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    arm = 0.3 * p.radius
    upright = np.maximum(np.abs(u + p.radius - arm) - arm, np.abs(v) - p.radius)
    foot = np.maximum(np.abs(v - p.radius + arm) - arm, np.abs(u) - p.radius)
    return np.minimum(upright, foot)


def _target(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    rho, period = np.hypot(u, v), p.radius / 2.2
    return np.maximum(np.abs(np.mod(rho, period) - period / 2) - period / 4, rho - 1.1 * p.radius)


def _wave(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    curve = 0.3 * p.radius * np.sin(2 * np.pi * u / p.radius)
    return np.maximum(np.abs(v - curve) - p.stroke / 2, np.abs(u) - 1.1 * p.radius)


def _crescent(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return np.maximum(np.hypot(u, v) - p.radius, p.radius - np.hypot(u - 0.5 * p.radius, v))


def _outline(sdf: Callable[[np.ndarray, np.ndarray, _Params], np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda u, v, p: np.abs(sdf(u, v, p)) - p.stroke / 2


def _disk(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return np.hypot(u, v) - p.radius


def _arc(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    """Upper half of a ring."""
    return np.maximum(np.abs(_disk(u, v, p)) - p.stroke / 2, v)


def _half_disk(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return np.maximum(_disk(u, v, p), v)


def _line(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return np.maximum(np.abs(v) - p.stroke / 2, np.abs(u) - 1.2 * p.radius)


def _square(u: np.ndarray, v: np.ndarray, p: _Params) -> np.ndarray:
    return _box(u, v, 0.8 * p.radius)


class _Shape(NamedTuple):
    """A shape class: signed distance (pixels, negative inside), base angle (deg), free rotation."""

    sdf: Callable[[np.ndarray, np.ndarray, _Params], np.ndarray]
    angle: float = 0.0
    free_rotation: bool = False


_SHAPES: types.MappingProxyType[str, _Shape] = types.MappingProxyType(
    {
        "disk": _Shape(_disk),
        "ring": _Shape(_outline(_disk)),
        "square": _Shape(_square),
        "square_outline": _Shape(_outline(_square)),
        "diamond": _Shape(_square, angle=45.0),
        "triangle": _Shape(_triangle),
        "triangle_outline": _Shape(_outline(_triangle)),
        "triangle_down": _Shape(_triangle, angle=180.0),
        "plus": _Shape(_plus),
        "x_cross": _Shape(_plus, angle=45.0),
        "l_shape": _Shape(_l_shape),
        "arc": _Shape(_arc),
        "half_disk": _Shape(_half_disk),
        "crescent": _Shape(_crescent, free_rotation=True),
        "target": _Shape(_target),
        "line": _Shape(_line, free_rotation=True),
        "wave": _Shape(_wave),
        "horizontal_stripes": _Shape(_stripes),
        "vertical_stripes": _Shape(_stripes, angle=90.0),
        "diagonal_stripes": _Shape(_stripes, angle=45.0),
        "antidiagonal_stripes": _Shape(_stripes, angle=135.0),
        "checkerboard": _Shape(_checkerboard),
        "dot_grid": _Shape(_dot_grid),
    }
)
SHAPE_CLASSES: tuple[str, ...] = tuple(_SHAPES)


def _shape_masks(shape: _Shape, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` anti-aliased masks (n, size, size) of one shape class at random pose and size."""
    center = rng.uniform(0.38, 0.62, (2, n, 1, 1)).astype(np.float32) * size
    turn = rng.uniform(0.0, 180.0, n) if shape.free_rotation else rng.uniform(-15.0, 15.0, n)
    angle = np.deg2rad(shape.angle + turn).astype(np.float32)[:, None, None]  # (n, 1, 1)
    params = _Params(*(rng.uniform(low, high, (n, 1, 1)).astype(np.float32) * size for low, high in _SIZES))
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx, dy = grid[None, None, :] - center[0], grid[None, :, None] - center[1]  # (n, 1, S), (n, S, 1)
    u = np.cos(angle) * dx + np.sin(angle) * dy  # (n, S, S)
    v = -np.sin(angle) * dx + np.cos(angle) * dy
    return np.clip(0.5 - shape.sdf(u, v, params), 0.0, 1.0).astype(np.float32)


def _gradients(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Linear blends of two random colours along a random direction: (n, size, size, 3)."""
    first, second = rng.random((2, n, 1, 1, 3), dtype=np.float32)
    direction = rng.uniform(0.0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    t = 0.5 + np.cos(direction) * ramp[None, None, :] + np.sin(direction) * ramp[None, :, None]  # (n, S, S)
    return first + (second - first) * t[..., None]


def _noisy_colors(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Flat random colours under Gaussian noise: (n, size, size, 3)."""
    sigma = rng.uniform(0.05, 0.2, (n, 1, 1, 1)).astype(np.float32)
    noise = rng.standard_normal((n, size, size, 3), dtype=np.float32)
    return rng.random((n, 1, 1, 3), dtype=np.float32) + sigma * noise


def _backgrounds(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random backgrounds (n, size, size, 3): flat colour, gradient, noisy colour or photo crop."""
    kind = rng.integers(0, 4, n)
    backgrounds = np.empty((n, size, size, 3), dtype=np.float32)
    backgrounds[kind == 0] = rng.random((int((kind == 0).sum()), 1, 1, 3), dtype=np.float32)
    backgrounds[kind == 1] = _gradients(int((kind == 1).sum()), size, rng)
    backgrounds[kind == 2] = _noisy_colors(int((kind == 2).sum()), size, rng)
    backgrounds[kind == 3] = _random_crops(int((kind == 3).sum()), size, rng)
    return backgrounds


def _shapes_chunk(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render the images of one chunk of labels: (n, size, size, 3) in [0, 1]."""
    n = len(labels)
    masks = np.empty((n, size, size), dtype=np.float32)
    for label, shape in enumerate(_SHAPES.values()):
        members = np.flatnonzero(labels == label)
        masks[members] = _shape_masks(shape, len(members), size, rng)
    background = _backgrounds(n, size, rng)
    color = _contrasting_colors(background.mean(axis=(1, 2)), rng, min_gap=0.3)[:, None, None]
    foreground = np.broadcast_to(color, (n, size, size, 3)).copy()
    textured = rng.random(n) < 0.15
    foreground[textured] = _random_crops(int(textured.sum()), size, rng)
    image = _blend(background, foreground, masks)
    image += 0.03 * rng.standard_normal((n, size, size, 1), dtype=np.float32)
    return image


def synthetic_shapes(num_images: int, image_size: int = 24, seed: int = 0) -> ImageTensorDataset:
    """Generate a pretraining set of geometric shapes and patterns, disjoint from digits.

    Classes (``SHAPE_CLASSES``, 23 of them) are filled and outlined disks, squares,
    diamonds and triangles, crosses, L-shapes, arcs, crescents, concentric rings, lines,
    waves, stripes in four orientations, checkerboards and dot grids. Each image draws
    its own position, size, rotation, stroke width and colours; backgrounds are flat,
    gradient, noisy or crops of scikit-learn's sample photos, and some shapes are filled
    with a photo texture. Labels are balanced (counts differ by at most one).

    Parameters
    ----------
    num_images : int
        Number of images, at least 1.
    image_size : int
        Side of the square images, at least 8.
    seed : int
        Seed of every random choice; the same arguments give the same dataset.

    Returns
    -------
    ImageTensorDataset
        Images (N, 3, S, S) normalized with mean 0.5 and std 0.5, int64 labels, and
        ``.classes`` equal to ``SHAPE_CLASSES``.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % len(SHAPE_CLASSES)).astype(np.int64)
    chunks = [
        _normalize(_shapes_chunk(labels[start : start + _SHAPES_CHUNK], image_size, rng))
        for start in range(0, num_images, _SHAPES_CHUNK)
    ]
    logger.debug("synthetic shapes: %d images of %d classes", num_images, len(SHAPE_CLASSES))
    return ImageTensorDataset(torch.cat(chunks), torch.from_numpy(labels), SHAPE_CLASSES)
