"""Synthetic defects for self-supervised training (CutPaste and the kitchen-board thesis 5.4.1).

Every function takes an RGB uint8 image ``(H, W, 3)`` and a
``np.random.Generator`` and returns a new image with one local synthetic
defect; the input is never modified and everything random comes from ``rng``,
so a seeded generator reproduces the same defect.

* ``cutpaste_basic`` (Li et al., CVPR 2021): a rectangle of 2-15 % of the
  image area, aspect ratio log-uniform in [0.3, 3.3], colour-jittered, pasted
  at another place.
* ``cutpaste_scar`` (Li et al.; sizes from the thesis): a thin rectangle,
  2-12 px wide and 20-50 px long, colour-jittered, rotated by up to ±45°, pasted
  at another place.
* ``black_dot``: a dark dot of 6-10 px diameter.
* ``white_dot_black_border``: a white dot in a black ring, 6-12 px across, the
  ring 20 % of the diameter thick.
* ``arc_scar``: a 60° arc of a circle of radius 35-90 px, 5 px thick.

The three drawn defects blend into the background with a transparency
gradient: their opacity is highest at the centre (of the dot, or of the arc's
stroke) and falls to zero at the edge; the arc also fades towards its ends.
Every defect lies wholly inside the image.

Sizes in pixels are those of the thesis, whose patches are 224 px. An image of
another size gets them scaled by ``min(H, W) / 224`` (floored at a size that
stays visible), so a 64 px image gets defects of the same *relative* size: a
black dot of 1.7-2.9 px, an arc of radius 10-26 px. The cut-and-paste area is a
fraction of the image and needs no scaling.
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

REFERENCE_SIDE = 224          # the thesis's patch size, at which the pixel sizes hold
COLOR_JITTER = 0.1            # brightness, contrast, saturation and hue jitter (Li et al.)

Augmentation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def size_scale(image: np.ndarray) -> float:
    """Factor applied to the thesis's pixel sizes for an image of this size."""
    return min(image.shape[:2]) / REFERENCE_SIDE


def _check(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")


# ----------------------------------------------------------------- cut and paste


def color_jitter(patch: np.ndarray, rng: np.random.Generator,
                 strength: float = COLOR_JITTER) -> np.ndarray:
    """torchvision-style ColorJitter(strength, strength, strength, strength) in random order.

    Brightness scales, contrast blends with the mean grey level, saturation
    blends with the grey image and hue rotates by up to ``strength`` of a turn.
    """
    if strength <= 0:
        return patch.copy()
    out = patch.astype(np.float32)

    def brightness(x):
        return x * rng.uniform(1 - strength, 1 + strength)

    def contrast(x):
        grey = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY).mean()
        return grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)

    def saturation(x):
        grey = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
        grey = grey.astype(np.float32)[:, :, None]
        return grey + (x - grey) * rng.uniform(1 - strength, 1 + strength)

    def hue(x):
        hsv = cv2.cvtColor(np.clip(x, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-strength, strength) * 180   # OpenCV hue runs over 0-179
        hsv[:, :, 0] = np.mod(hsv[:, :, 0].astype(np.float32) + shift, 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)

    for index in rng.permutation(4):
        out = (brightness, contrast, saturation, hue)[index](out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _other_position(rng: np.random.Generator, limit_x: int, limit_y: int,
                    avoid: tuple[int, int]) -> tuple[int, int]:
    """A random top-left corner in [0, limit], different from ``avoid`` when there is room."""
    for _ in range(100):
        x, y = int(rng.integers(0, limit_x + 1)), int(rng.integers(0, limit_y + 1))
        if (x, y) != avoid or (limit_x == 0 and limit_y == 0):
            return x, y
    return x, y


def cutpaste_basic(image: np.ndarray, rng: np.random.Generator,
                   area_ratio: tuple[float, float] = (0.02, 0.15),
                   aspect_ratio: tuple[float, float] = (0.3, 3.3),
                   jitter: float = COLOR_JITTER) -> np.ndarray:
    """CutPaste: a colour-jittered rectangle of the image pasted at another place."""
    _check(image)
    height, width = image.shape[:2]
    area = rng.uniform(*area_ratio) * height * width
    aspect = math.exp(rng.uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1])))
    cut_w = int(np.clip(round(math.sqrt(area * aspect)), 1, width))
    cut_h = int(np.clip(round(math.sqrt(area / aspect)), 1, height))
    src_x, src_y = int(rng.integers(0, width - cut_w + 1)), int(rng.integers(0, height - cut_h + 1))
    patch = color_jitter(image[src_y:src_y + cut_h, src_x:src_x + cut_w], rng, jitter)
    dst_x, dst_y = _other_position(rng, width - cut_w, height - cut_h, (src_x, src_y))
    out = image.copy()
    out[dst_y:dst_y + cut_h, dst_x:dst_x + cut_w] = patch
    return out


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator,
                  width_px: tuple[float, float] = (2, 12),
                  length_px: tuple[float, float] = (20, 50),
                  rotation_deg: tuple[float, float] = (-45, 45),
                  jitter: float = COLOR_JITTER) -> np.ndarray:
    """CutPaste-Scar: a thin, colour-jittered, rotated strip of the image pasted elsewhere."""
    _check(image)
    height, width = image.shape[:2]
    scale = size_scale(image)
    cut_w = int(np.clip(round(rng.uniform(*width_px) * scale), 1, width))
    cut_h = int(np.clip(round(rng.uniform(*length_px) * scale), 2, height))
    src_x, src_y = int(rng.integers(0, width - cut_w + 1)), int(rng.integers(0, height - cut_h + 1))
    strip = color_jitter(image[src_y:src_y + cut_h, src_x:src_x + cut_w], rng, jitter)

    # Rotate the strip and its footprint onto a canvas that holds every angle
    # (nearest neighbour: the strip keeps its pixels and its area).
    angle = rng.uniform(*rotation_deg)
    side = int(math.ceil(math.hypot(cut_w, cut_h))) + 1
    canvas = np.zeros((side, side, 3), np.uint8)
    footprint = np.zeros((side, side), np.uint8)
    ox, oy = (side - cut_w) // 2, (side - cut_h) // 2
    canvas[oy:oy + cut_h, ox:ox + cut_w] = strip
    footprint[oy:oy + cut_h, ox:ox + cut_w] = 1
    turn = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
    canvas = cv2.warpAffine(canvas, turn, (side, side), flags=cv2.INTER_NEAREST)
    footprint = cv2.warpAffine(footprint, turn, (side, side), flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(footprint)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    canvas, footprint = canvas[y0:y1, x0:x1], footprint[y0:y1, x0:x1].astype(bool)
    box_h, box_w = min(y1 - y0, height), min(x1 - x0, width)
    canvas, footprint = canvas[:box_h, :box_w], footprint[:box_h, :box_w]

    dst_x, dst_y = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    out = image.copy()
    region = out[dst_y:dst_y + box_h, dst_x:dst_x + box_w]
    region[footprint] = canvas[footprint]
    return out


# ------------------------------------------------------------- drawn defects


def _blend(image: np.ndarray, x0: int, y0: int, alpha: np.ndarray,
           color: np.ndarray) -> np.ndarray:
    """``image`` with ``color`` laid over the window at (x0, y0) with opacity ``alpha``.

    ``color`` is (h, w, 3) or a single RGB triple; the window is clipped to the image.
    """
    out = image.copy()
    height, width = image.shape[:2]
    h, w = alpha.shape
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, width), min(y0 + h, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return out
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]
    c = np.broadcast_to(np.asarray(color, np.float32), (h, w, 3))
    c = c[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    window = out[cy0:cy1, cx0:cx1].astype(np.float32)
    out[cy0:cy1, cx0:cx1] = np.clip(np.rint(window * (1 - a) + c * a), 0, 255).astype(np.uint8)
    return out


def _dot_window(image: np.ndarray, rng: np.random.Generator, diameter: float
                ) -> tuple[int, int, np.ndarray]:
    """(x0, y0, distance of each window pixel centre to a random dot centre)."""
    height, width = image.shape[:2]
    radius = diameter / 2
    cx = rng.uniform(radius, max(width - radius, radius))
    cy = rng.uniform(radius, max(height - radius, radius))
    x0, y0 = int(math.floor(cx - radius)), int(math.floor(cy - radius))
    size = int(math.ceil(diameter)) + 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return x0, y0, np.hypot(xs + x0 + 0.5 - cx, ys + y0 + 0.5 - cy)


def _radial_alpha(distance: np.ndarray, radius: float, peak: float, power: float) -> np.ndarray:
    """Opacity ``peak`` at the centre falling to 0 at ``radius``: peak * (1 - (r/R)^power)."""
    return peak * np.clip(1 - (distance / radius) ** power, 0, 1)


def black_dot(image: np.ndarray, rng: np.random.Generator,
              diameter_px: tuple[float, float] = (6, 10)) -> np.ndarray:
    """A dark speck whose opacity falls off from its centre."""
    _check(image)
    diameter = max(rng.uniform(*diameter_px) * size_scale(image), 1.5)
    x0, y0, distance = _dot_window(image, rng, diameter)
    alpha = _radial_alpha(distance, diameter / 2, rng.uniform(0.8, 1.0), power=2)
    color = np.full(3, rng.uniform(0, 40), np.float32)
    return _blend(image, x0, y0, alpha, color)


def white_dot_black_border(image: np.ndarray, rng: np.random.Generator,
                           diameter_px: tuple[float, float] = (6, 12),
                           border_fraction: float = 0.2) -> np.ndarray:
    """A white dot in a black ring ``border_fraction`` of the diameter thick, fading outwards."""
    _check(image)
    diameter = max(rng.uniform(*diameter_px) * size_scale(image), 2.5)
    border = max(border_fraction * diameter, 0.5)
    x0, y0, distance = _dot_window(image, rng, diameter)
    radius = diameter / 2
    # A steep falloff (power 4) keeps the ring, the outer part, clearly visible.
    alpha = _radial_alpha(distance, radius, rng.uniform(0.85, 1.0), power=4)
    white, black = rng.uniform(220, 255), rng.uniform(0, 40)
    inner = np.clip(radius - border - distance + 0.5, 0, 1)   # anti-aliased inner edge
    color = (black + (white - black) * inner)[:, :, None].repeat(3, axis=2)
    return _blend(image, x0, y0, alpha, color)


def arc_scar(image: np.ndarray, rng: np.random.Generator,
             radius_px: tuple[float, float] = (35, 90), thickness_px: float = 5,
             span_deg: float = 60) -> np.ndarray:
    """A 60° circular-arc scratch, dark or bright, fading across its stroke and to its ends."""
    _check(image)
    height, width = image.shape[:2]
    scale = size_scale(image)
    radius = rng.uniform(*radius_px) * scale
    half_thick = max(thickness_px * scale, 1.0) / 2
    half_span = math.radians(span_deg) / 2
    # ``facing`` points from the circle's centre to the arc's midpoint. Points
    # along the arc, relative to the centre, give its extent; the centre is then
    # drawn so that the whole arc lies inside the image (where it fits).
    facing = rng.uniform(0, 2 * math.pi)
    angles = facing + np.linspace(-half_span, half_span, 33)
    px, py = radius * np.cos(angles), radius * np.sin(angles)
    margin = half_thick + 1
    cx = rng.uniform(margin - px.min(), max(width - margin - px.max(), margin - px.min()))
    cy = rng.uniform(margin - py.min(), max(height - margin - py.max(), margin - py.min()))

    # The window spanned by the arc and its stroke width.
    x0, y0 = int(math.floor(cx + px.min() - margin)), int(math.floor(cy + py.min() - margin))
    x1, y1 = int(math.ceil(cx + px.max() + margin)), int(math.ceil(cy + py.max() + margin))
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    across = np.abs(np.hypot(xs - cx, ys - cy) - radius)             # distance to the arc's line
    # Angle from the midpoint, wrapped to (-pi, pi].
    along = np.angle(np.exp(1j * (np.arctan2(ys - cy, xs - cx) - facing)))
    across_alpha = np.clip(1 - (across / half_thick) ** 2, 0, 1)
    along_alpha = np.clip(np.cos(along / half_span * math.pi / 2), 0, 1) ** 0.5
    along_alpha[np.abs(along) > half_span] = 0
    alpha = rng.uniform(0.7, 1.0) * across_alpha * along_alpha
    level = rng.uniform(0, 50) if rng.random() < 0.5 else rng.uniform(205, 255)
    return _blend(image, x0, y0, alpha.astype(np.float32), np.full(3, level, np.float32))


AUGMENTATIONS: dict[str, Augmentation] = {
    "cutpaste": cutpaste_basic,
    "scar": cutpaste_scar,
    "black_dot": black_dot,
    "white_dot": white_dot_black_border,
    "arc_scar": arc_scar,
}
