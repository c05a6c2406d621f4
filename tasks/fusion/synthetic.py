"""Synthetic defects pasted on held-out good images (SegAD appendix A.2): the defective
examples of the one-class fusion."""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import DefectflowError
from .segments import as_rgb_uint8, resize_nearest

DEFECT_KINDS = ("blur", "rectangle", "line")


def synthesize_defects(image_rgb: np.ndarray, segments: np.ndarray, rng: np.random.Generator,
                       kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defect on a held-out good image (SegAD appendix A.2); returns (image, mask).

    ``kind`` (random when None) is one of:

    - ``"blur"``: Gaussian blur of a random box around a point of one
      segment, applied only where the box lies in that segment;
    - ``"rectangle"``: a small filled rectangle (3-10 % of the side) of a
      random colour, or grey level on grey images, far from the local mean;
    - ``"line"``: a thin rectangle, 1-3 px wide and 10-30 % of the side
      long, at a random angle, of such a colour.

    ``segments`` is the category's (S, S) id map, resized to the image by
    nearest neighbour. ``mask`` (bool, H x W) is the defect's footprint: every
    pixel that changed lies in it, and it is never empty. A blur that barely
    changes anything (a flat region) is tried elsewhere, then replaced by a
    rectangle, so the defect is always visible.
    """
    image = np.asarray(image_rgb)
    grey_input = image.ndim == 2
    rgb = as_rgb_uint8(image, "image")
    height, width = rgb.shape[:2]
    segments = np.asarray(segments)
    if segments.ndim != 2:
        raise DefectflowError(f"segments have shape {segments.shape}; expected (S, S)")
    if segments.shape != (height, width):
        segments = resize_nearest(segments, height, width)
    kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))] if kind is None else kind
    if kind not in DEFECT_KINDS:
        raise DefectflowError(f"unknown synthetic defect {kind!r} (use one of {DEFECT_KINDS})")
    grey = bool((rgb == rgb[..., :1]).all())
    side = min(height, width)

    out, mask = None, None
    if kind == "blur":
        for _ in range(10):
            out, mask = _blur_defect(rgb, segments, rng, side)
            if mask.any() and np.abs(out.astype(int) - rgb)[mask].mean() >= 2.0:
                break
        else:
            kind = "rectangle"
    if kind in ("rectangle", "line"):
        y, x = _point_in_segment(segments, rng)
        if kind == "rectangle":
            half_h = max(1, int(rng.uniform(0.015, 0.05) * side))
            half_w = max(1, int(rng.uniform(0.015, 0.05) * side))
            mask = np.zeros((height, width), bool)
            mask[max(0, y - half_h):y + half_h + 1, max(0, x - half_w):x + half_w + 1] = True
        else:
            mask = _thin_rectangle((height, width), (y, x),
                                   length=max(3.0, rng.uniform(0.1, 0.3) * side),
                                   thickness=int(rng.integers(1, 4)),
                                   angle=rng.uniform(0, np.pi))
        out = rgb.copy()
        out[mask] = _contrasting_colour(rgb[mask], grey, rng)
    return (out[..., 0].copy() if grey_input else out), mask


def _point_in_segment(segments: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random pixel of a random segment (segments of fewer than 9 pixels only if all are)."""
    ids, counts = np.unique(segments, return_counts=True)
    candidates = ids[counts >= 9] if (counts >= 9).any() else ids
    ys, xs = np.nonzero(segments == candidates[int(rng.integers(len(candidates)))])
    pick = int(rng.integers(len(ys)))
    return int(ys[pick]), int(xs[pick])


def _blur_defect(rgb: np.ndarray, segments: np.ndarray, rng: np.random.Generator,
                 side: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _point_in_segment(segments, rng)
    half = max(2, int(rng.uniform(0.05, 0.15) * side))
    box = np.zeros(segments.shape, bool)
    box[max(0, y - half):y + half + 1, max(0, x - half):x + half + 1] = True
    mask = box & (segments == segments[y, x])
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigmaX=float(rng.uniform(2.0, 5.0)))
    out = rgb.copy()
    out[mask] = blurred[mask]
    return out, mask


def _thin_rectangle(shape: tuple[int, int], centre: tuple[int, int], length: float,
                    thickness: int, angle: float) -> np.ndarray:
    """Pixels whose centres lie in a rotated length x thickness rectangle (exact width;
    cv2.line's thick lines add round caps and grow wider on diagonals)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    dy, dx = ys - centre[0], xs - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= thickness / 2)


def _contrasting_colour(pixels: np.ndarray, grey: bool, rng: np.random.Generator) -> np.ndarray:
    """A random colour (grey level on grey images) at least 80 levels from the pixels' mean."""
    mean = pixels.reshape(-1, 3).mean(axis=0)
    for _ in range(20):
        colour = np.full(3, rng.integers(0, 256)) if grey else rng.integers(0, 256, size=3)
        if np.abs(colour - mean).max() >= 80:
            return colour.astype(np.uint8)
    # Mean near mid-grey on every channel: the far end of the range always contrasts.
    return np.where(mean < 128, 255, 0).astype(np.uint8)
