"""Reading images and masks from disk, and hashing their content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np

from .errors import DefectflowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def file_hash(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def text_hash(*parts: object) -> str:
    """SHA-256 over the string forms of ``parts``: the key of derived, content-addressed data."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _decode(path: str | Path, flags: int, what: str) -> np.ndarray:
    """Decode an image file with OpenCV; a missing or undecodable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise DefectflowError(f"{what} file not found", path)
    data = np.fromfile(str(path), dtype=np.uint8)
    decoded = cv2.imdecode(data, flags) if data.size else None
    if decoded is None:
        raise DefectflowError(f"cannot decode {what} (corrupt or not an image file)", path)
    return decoded


def read_image(path: str | Path) -> np.ndarray:
    """An image as an RGB uint8 array (H, W, 3); grayscale files are repeated to three channels."""
    image = _decode(path, cv2.IMREAD_UNCHANGED, "image")
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF: scale to 8 bit
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): any non-zero pixel is defective.

    ``expected_hw`` is the (height, width) of the image the mask belongs to; a
    mask of another size is an error naming the mask file.
    """
    mask = _decode(path, cv2.IMREAD_GRAYSCALE, "mask")
    if expected_hw is not None and tuple(mask.shape[:2]) != tuple(expected_hw):
        raise DefectflowError(
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
            f"{expected_hw[1]}x{expected_hw[0]}",
            path,
        )
    return mask > 0


def image_header(path: str | Path) -> tuple[int, int, int]:
    """(width, height, channels) of an image file, decoding it to be sure it is readable."""
    image = _decode(path, cv2.IMREAD_UNCHANGED, "image")
    channels = 1 if image.ndim == 2 else image.shape[2]
    return int(image.shape[1]), int(image.shape[0]), int(channels)
