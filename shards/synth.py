"""Procedural dermoscopy-like lesions: deterministic from a seed, visibly different per class.

Used when the real ISIC images are not available (tests, smoke runs, benchmarks). Every image is a
pure function of (seed, label, size, hair_probability), so workers can render in any order.

Speed: everything is vectorised numpy on float32; per-size coordinate grids are cached, random
fields are drawn at low resolution and upsampled by PIL (C code), and the lesion boundary is a
360-entry radius table indexed by a cached angle grid instead of per-pixel trigonometry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from runtime.config import CLASSES
from runtime.seeding import derive_seed

_ANGLE_BINS = 360


@dataclass(frozen=True)
class _Grids:
    """Radius / angle-bin grids of a 2S x 2S canvas centred at (S, S): slicing an S x S window
    re-centres them on any lesion centre without recomputing (a free numpy view)."""

    radius: np.ndarray  # float32, distance from centre in units of S/2
    angle_bin: np.ndarray  # int16, angle in [0, _ANGLE_BINS)
    vignette: np.ndarray  # float32 1 x S x S: 255 inside the dermoscope field, 0 outside (to uint8 scale)


@lru_cache(maxsize=8)
def _grids(size: int) -> _Grids:
    ax = (np.arange(2 * size, dtype=np.float32) - size + 0.5) / (size / 2)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    radius = np.sqrt(xx * xx + yy * yy)
    angle = np.arctan2(yy, xx)
    angle_bin = ((angle + np.pi) / (2 * np.pi) * _ANGLE_BINS).astype(np.int16) % _ANGLE_BINS
    r_img = radius[size // 2: size // 2 + size, size // 2: size // 2 + size]  # 1.0 at the edge middles
    vignette = np.clip((1.1 - r_img) / 0.08, 0.0, 1.0) * np.clip(1.15 - 0.25 * r_img, 0.0, 1.0)
    return _Grids(radius, angle_bin, (255 * vignette[None]).astype(np.float32))


def _noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth random field in [0, 1): a cells x cells grid upsampled bilinearly (C code in PIL)."""
    low = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(low.resize((size, size), Image.BILINEAR))


def _rgb(*values: float) -> np.ndarray:
    return np.array(values, np.float32).reshape(3, 1, 1)


def _paint(col: np.ndarray, colour: np.ndarray, where: np.ndarray) -> None:
    """col += (colour - col) * where, in place. Arithmetic blending with a float mask is several
    times faster than boolean-mask assignment, which mispredicts on random masks."""
    col += (colour - col) * where


@dataclass(frozen=True)
class _Style:
    radius: tuple[float, float]  # lesion radius range, in units of S/2
    irregularity: float  # amplitude of the boundary harmonics (asymmetry)
    colour: tuple[float, float, float]  # main pigment, RGB in [0, 1]
    softness: float  # boundary blur, in radius units


_STYLES: dict[str, _Style] = {
    "MEL": _Style((0.55, 0.75), 0.22, (0.28, 0.16, 0.10), 0.04),
    "NV": _Style((0.25, 0.38), 0.04, (0.50, 0.32, 0.20), 0.05),
    "BCC": _Style((0.35, 0.50), 0.10, (0.90, 0.66, 0.68), 0.10),
    "AKIEC": _Style((0.35, 0.55), 0.12, (0.82, 0.42, 0.40), 0.08),
    "BKL": _Style((0.35, 0.55), 0.08, (0.70, 0.52, 0.34), 0.04),
    "DF": _Style((0.22, 0.32), 0.05, (0.48, 0.30, 0.20), 0.08),
    "VASC": _Style((0.25, 0.40), 0.06, (0.70, 0.22, 0.30), 0.05),
}


def _pigment(name: str, rng: np.random.Generator, size: int, r_rel: np.ndarray, style: _Style) -> np.ndarray:
    """Class-specific lesion colour field (3 x S x S, channel-first so that broadcasting runs over
    long contiguous rows), before blending with the skin."""
    base = _rgb(*style.colour) * rng.uniform(0.9, 1.1, (3, 1, 1)).astype(np.float32)
    fine = _noise(rng, max(8, size // 4), size)
    shade = (fine - 0.5) * 0.10  # brightness variation shared by all channels
    if name == "MEL":  # multi-colour: blue-grey veil and black blotches on dark brown
        col = base + shade
        _paint(col, _rgb(0.42, 0.48, 0.58), np.clip((_noise(rng, 5, size) - 0.55) * 4, 0, 1))
        _paint(col, _rgb(0.08, 0.06, 0.06), np.clip((_noise(rng, 6, size) - 0.6) * 30, 0, 1))
    elif name == "BCC":  # pearly pink with thin red branching vessels (ridges of a smooth field)
        col = base + 0.05 + shade
        _paint(col, _rgb(0.72, 0.08, 0.12), np.clip(1.6 - np.abs(_noise(rng, 10, size) - 0.5) * 50, 0, 1))
    elif name == "AKIEC":  # rough scaly surface: high-frequency noise with white scale flecks
        rough = _noise(rng, size // 2, size)
        col = base + (shade + (rough - 0.5) * 0.35)
        _paint(col, _rgb(0.93, 0.93, 0.93), (rough > 0.85).astype(np.float32))
    elif name == "BKL":  # waxy tan with granular dots
        col = base + shade
        col *= 1 - 0.45 * (_noise(rng, size // 2, size) > 0.8)
    elif name == "DF":  # brown ring around a white central patch
        col = base + shade
        _paint(col, _rgb(0.92, 0.92, 0.92), np.clip((0.5 - r_rel) / 0.12, 0, 1))
    elif name == "VASC":  # red / purple lacunae
        col = base + shade
        _paint(col, _rgb(0.45, 0.08, 0.30), np.clip((_noise(rng, 9, size) - 0.55) * 20, 0, 1))
    else:  # NV: uniform brown with a faint reticular network
        col = base + (shade - (fine > 0.7) * np.float32(0.06))
    return col


def _hairs(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    """Draw 1-6 thin dark quadratic curves in place (all hairs sampled densely in one array)."""
    n = int(rng.integers(1, 7))
    ctrl = rng.uniform(-0.1, 1.1, (n, 3, 1, 2)) * size  # control points p0, p1, p2 per hair
    t = np.linspace(0.0, 1.0, 3 * size)[:, None]
    pts = (1 - t) ** 2 * ctrl[:, 0] + 2 * (1 - t) * t * ctrl[:, 1] + t ** 2 * ctrl[:, 2]  # n x T x 2
    shade = np.repeat(rng.uniform(0.05, 0.2, n), 3 * size)
    ys, xs = pts[..., 0].astype(np.int32).ravel(), pts[..., 1].astype(np.int32).ravel()
    for dy in range(1 + int(size >= 128)):  # 2 px wide at large sizes
        ok = (ys + dy >= 0) & (ys + dy < size) & (xs >= 0) & (xs < size)
        img[:, ys[ok] + dy, xs[ok]] = shade[ok]


def render_lesion(seed: int, label: int, size: int, hair_probability: float = 0.5) -> np.ndarray:
    """One synthetic dermoscopy image (uint8, size x size x 3) of class ``CLASSES[label]``."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label {label} out of range; allowed 0..{len(CLASSES) - 1} ({', '.join(CLASSES)})")
    if size < 8:
        raise ValueError(f"size {size} too small; need >= 8")
    name = CLASSES[label]
    style = _STYLES[name]
    rng = np.random.default_rng(derive_seed(seed, "synth", label, size))
    g = _grids(size)

    # Skin: a per-image tone plus low-frequency blotchiness and fine texture.
    tone = _rgb(0.88, 0.68, 0.56) * np.float32(rng.uniform(0.85, 1.05))
    texture = (_noise(rng, 4, size) - 0.5) * 0.10 + (_noise(rng, max(8, size // 8), size) - 0.5) * 0.05

    # Lesion shape: a radius per angle bin (random harmonics) compared with the pixel radius.
    cy, cx = (rng.uniform(-0.12, 0.12, 2) * size).astype(int) + size // 2
    radius_grid = g.radius[size - cy: 2 * size - cy, size - cx: 2 * size - cx]
    bins = g.angle_bin[size - cy: 2 * size - cy, size - cx: 2 * size - cx]
    theta = np.linspace(-np.pi, np.pi, _ANGLE_BINS, endpoint=False)
    boundary = np.ones(_ANGLE_BINS)
    for k in range(1, 7):
        boundary += style.irregularity / k ** 0.7 * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r0 = (rng.uniform(*style.radius) * np.clip(boundary, 0.4, 1.8)).astype(np.float32)
    r_rel = radius_grid / r0[bins]  # < 1 inside the lesion
    mask = np.clip((1.0 - r_rel) / style.softness, 0.0, 1.0)

    # Blend in place: img = skin + (lesion - skin) * mask, computed on the lesion array.
    img = _pigment(name, rng, size, r_rel, style)
    skin = tone + texture
    img -= skin
    img *= mask
    img += skin
    if rng.random() < hair_probability:
        _hairs(img, rng, size)
    img *= g.vignette  # already scaled by 255
    np.clip(img, 0.0, 255.0, out=img)
    out = np.empty((size, size, 3), np.uint8)  # channel-last for PIL / JPEG
    for c in range(3):
        out[..., c] = img[c]
    return out


def class_sequence(n: int, seed: int, weights: tuple[float, ...] | None = None) -> np.ndarray:
    """Labels for ``n`` images: balanced (each class n//7 or n//7+1 times) or drawn with ``weights``,
    then shuffled deterministically from ``seed``."""
    rng = np.random.default_rng(derive_seed(seed, "synth-labels"))
    if weights is None:
        labels = np.arange(n) % len(CLASSES)
    else:
        if len(weights) != len(CLASSES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(CLASSES)} non-negative numbers ({', '.join(CLASSES)})")
        p = np.asarray(weights, float) / sum(weights)
        labels = rng.choice(len(CLASSES), size=n, p=p)
    return rng.permutation(labels)


def generate(n: int, seed: int, size: int, hair_probability: float = 0.5,
             weights: tuple[float, ...] | None = None) -> Iterator[tuple[str, int, np.ndarray]]:
    """Yield (image id, label, image) for ``n`` synthetic lesions; ids are ``synth_000123``."""
    for i, label in enumerate(class_sequence(n, seed, weights)):
        yield synth_id(i), int(label), render_lesion(derive_seed(seed, i), int(label), size, hair_probability)


def synth_id(index: int) -> str:
    return f"synth_{index:06d}"
