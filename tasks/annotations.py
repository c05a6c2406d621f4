"""Region annotations of large images: active areas, excluded regions and polygon masks.

Two file formats:

*Thesis annotation JSON* (kitchen-board thesis, section 3.2.3): one entry per
image file name, each with optional ``borders`` (the active area(s); outside
them is background) and ``labels`` (printed labels and other regions to leave
out), every box as ``[x, y, w, h]`` in pixels::

    {"231117_0302_1.jpg": {"labels": [[659, 2231, 600, 1239]],
                           "borders": [[617, 161, 3279, 3424]]}}

*LabelMe JSON*: ``shapes[*]`` with ``label``, ``points`` and ``shape_type``
(polygon, rectangle, circle, ...); rasterized into a ground-truth mask.

A box ``(x, y, w, h)`` covers the pixels ``x <= column < x + w`` and
``y <= row < y + h``. Every problem is a :class:`DefectflowError` naming the
JSON file and, where there is one, the image entry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import DefectflowError

Box = tuple[int, int, int, int]

ANNOTATION_KEYS = ("borders", "labels")

# LabelMe shape types that enclose an area; the others (line, linestrip, point) mark none.
_AREA_SHAPES = ("polygon", "rectangle", "circle")
_NO_AREA_SHAPES = ("line", "linestrip", "point", "points")


@dataclass(frozen=True)
class ImageAnnotation:
    """The regions of one image: active area(s) and excluded boxes, each ``(x, y, w, h)``.

    No ``borders`` means the whole image is active.
    """

    borders: tuple[Box, ...] = ()
    labels: tuple[Box, ...] = ()


# --------------------------------------------------------------------------- thesis JSON


def _read_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise DefectflowError(f"{what} file not found", path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DefectflowError(f"cannot read {what} file: {error}", path) from None
    except json.JSONDecodeError as error:
        raise DefectflowError(
            f"{what} file is not valid JSON (line {error.lineno}, column {error.colno}: "
            f"{error.msg})",
            path,
        ) from None


def _parse_box(value: object, path: Path, image_name: str, key: str, index: int) -> Box:
    where = f"image {image_name!r}: {key}[{index}]"
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise DefectflowError(f"{where} = {value!r} is not a box [x, y, w, h] of 4 integers",
                              path)
    x, y, w, h = value
    if min(x, y, w, h) < 0:
        raise DefectflowError(f"{where} = {value!r} has a negative value", path)
    if w == 0 or h == 0:
        raise DefectflowError(f"{where} = {value!r} has zero width or height", path)
    return (x, y, w, h)


def _parse_annotation(entry: object, path: Path, image_name: str) -> ImageAnnotation:
    if not isinstance(entry, dict):
        raise DefectflowError(
            f"image {image_name!r}: entry must be an object with 'borders' and/or 'labels', "
            f"got {type(entry).__name__}",
            path,
        )
    unknown = sorted(set(entry) - set(ANNOTATION_KEYS))
    if unknown:
        raise DefectflowError(
            f"image {image_name!r}: unknown keys {unknown}; valid keys: "
            f"{', '.join(ANNOTATION_KEYS)}",
            path,
        )
    boxes: dict[str, tuple[Box, ...]] = {}
    for key in ANNOTATION_KEYS:
        value = entry.get(key, [])
        if not isinstance(value, list):
            raise DefectflowError(
                f"image {image_name!r}: {key} must be a list of [x, y, w, h] boxes, "
                f"got {value!r}",
                path,
            )
        boxes[key] = tuple(
            _parse_box(box, path, image_name, key, index) for index, box in enumerate(value)
        )
    if "borders" in entry and not boxes["borders"]:
        # An empty active area would inspect nothing; leaving the key out means the whole image.
        raise DefectflowError(
            f"image {image_name!r}: borders is empty (leave it out to use the whole image)", path
        )
    return ImageAnnotation(borders=boxes["borders"], labels=boxes["labels"])


def load_annotations(path: str | Path) -> dict[str, ImageAnnotation]:
    """The thesis annotation file: image file name -> :class:`ImageAnnotation`.

    Raises:
        DefectflowError: naming the file (and the image entry) when it is
            missing, not JSON, not an object, has an unknown key, or holds a
            box that is not 4 non-negative integers with non-zero size.
            Boxes are checked against an image's size by :func:`check_annotation`.
    """
    path = Path(path)
    data = _read_json(path, "annotation")
    if not isinstance(data, dict):
        raise DefectflowError(
            "annotation file must hold a JSON object mapping image file names to "
            f"{{'borders': [...], 'labels': [...]}}, got {type(data).__name__}",
            path,
        )
    return {str(name): _parse_annotation(entry, path, str(name)) for name, entry in data.items()}


def annotation_for_image(annotation_path: str | Path | None,
                         image_path: str | Path) -> ImageAnnotation | None:
    """The entry of an image (looked up by its file name) in an annotation file, or None.

    ``annotation_path`` is a manifest row's ``annotation_path`` (None: no file).
    """
    if not annotation_path or not isinstance(annotation_path, (str, Path)):
        return None
    return load_annotations(annotation_path).get(Path(image_path).name)


def check_annotation(annotation: ImageAnnotation, width: int, height: int,
                     json_path: str | Path, image_name: str) -> None:
    """Raise a DefectflowError naming the file and image when a box leaves the image."""
    for key in ANNOTATION_KEYS:
        for index, (x, y, w, h) in enumerate(getattr(annotation, key)):
            if x + w > width or y + h > height:
                raise DefectflowError(
                    f"image {image_name!r}: {key}[{index}] = [{x}, {y}, {w}, {h}] reaches "
                    f"({x + w}, {y + h}), outside the {width}x{height} image",
                    json_path,
                )


def boxes_intersect(a: Box, b: Box) -> bool:
    """Whether two boxes share at least one pixel."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def excluded_mask(annotation: ImageAnnotation | None, width: int, height: int) -> np.ndarray:
    """Bool (H, W): True outside the borders (when there are any) and inside every label box."""
    if annotation is None:
        return np.zeros((height, width), dtype=bool)
    if annotation.borders:
        excluded = np.ones((height, width), dtype=bool)
        for x, y, w, h in annotation.borders:
            excluded[y:y + h, x:x + w] = False
    else:
        excluded = np.zeros((height, width), dtype=bool)
    for x, y, w, h in annotation.labels:
        excluded[y:y + h, x:x + w] = True
    return excluded


# --------------------------------------------------------------------------- polygon masks


def rasterize_polygons(shapes: Iterable[Sequence[Sequence[float]]], width: int,
                       height: int) -> np.ndarray:
    """Bool (H, W) mask of the filled polygons (each a sequence of (x, y) points).

    Points are rounded to the nearest pixel; the pixels on a polygon's outline
    count as inside (OpenCV ``fillPoly``). Polygons of fewer than three points
    fill their outline only.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    polygons = [np.rint(np.asarray(points, dtype=np.float64)).astype(np.int32).reshape(-1, 2)
                for points in shapes]
    polygons = [polygon for polygon in polygons if len(polygon)]
    if polygons:
        cv2.fillPoly(mask, polygons, 1)
    return mask.astype(bool)


def _shape_points(shape: dict, path: Path, index: int) -> np.ndarray:
    points = shape.get("points")
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 2 or array.shape[1] != 2 or len(array) == 0 \
            or not np.isfinite(array).all():
        raise DefectflowError(
            f"shapes[{index}]: points must be a list of [x, y] numbers, got {points!r}"[:300],
            path,
        )
    return array


def labelme_mask(json_path: str | Path, width: int, height: int,
                 labels: Iterable[str] | None = None) -> np.ndarray:
    """Bool (H, W) ground-truth mask from a LabelMe file's shapes.

    Polygons are filled, rectangles (two corners) filled, circles (centre and
    a point on the circle) filled; lines and points enclose no area and are
    ignored. ``labels`` keeps only shapes with those labels (default: all).

    Raises:
        DefectflowError: naming the file when it is not LabelMe JSON, a shape
            is malformed or of an unknown type, or its ``imageWidth`` /
            ``imageHeight`` differ from ``width`` / ``height``.
    """
    path = Path(json_path)
    data = _read_json(path, "LabelMe")
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise DefectflowError("not a LabelMe file: expected an object with a 'shapes' list", path)
    stated = (data.get("imageWidth"), data.get("imageHeight"))
    if all(isinstance(v, int) for v in stated) and stated != (width, height):
        raise DefectflowError(
            f"LabelMe file is for a {stated[0]}x{stated[1]} image, but the image is "
            f"{width}x{height}",
            path,
        )
    wanted = None if labels is None else set(labels)
    polygons: list[np.ndarray] = []
    mask = np.zeros((height, width), dtype=np.uint8)
    for index, shape in enumerate(data["shapes"]):
        if not isinstance(shape, dict):
            raise DefectflowError(f"shapes[{index}] is not an object", path)
        if wanted is not None and shape.get("label") not in wanted:
            continue
        kind = shape.get("shape_type") or "polygon"  # old LabelMe files have no shape_type
        if kind in _NO_AREA_SHAPES:
            continue
        if kind not in _AREA_SHAPES:
            raise DefectflowError(
                f"shapes[{index}]: unsupported shape_type {kind!r}; supported: "
                f"{', '.join(_AREA_SHAPES + _NO_AREA_SHAPES)}",
                path,
            )
        points = _shape_points(shape, path, index)
        if kind == "polygon":
            polygons.append(points)
        elif kind == "rectangle":
            if len(points) == 2:
                (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
                polygons.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
            else:
                polygons.append(points)
        else:  # circle: centre, then a point on the circle
            if len(points) != 2:
                raise DefectflowError(
                    f"shapes[{index}]: a circle needs 2 points (centre, edge), got {len(points)}",
                    path,
                )
            centre = tuple(int(v) for v in np.rint(points[0]))
            radius = int(round(float(np.hypot(*(points[1] - points[0])))))
            cv2.circle(mask, centre, radius, 1, thickness=-1)
    return mask.astype(bool) | rasterize_polygons(polygons, width, height)
