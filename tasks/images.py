"""Reading images and masks from disk, and hashing their content.

An image is bounded before it is decoded: its width and height are read from the file's
header (PNG, JPEG, BMP, TIFF) and an image over ``max_pixels`` is refused without being
decoded, so a small file that would decode to gigabytes (a decompression bomb) costs
nothing. Any exception of the decoder becomes a DefectflowError naming the file, which the
scan counts as a skipped image and the inbox as a quarantined one.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .errors import DefectflowError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Default pixel limit (``dataset.max_image_pixels``): 16384 x 16384, 768 MiB as RGB.
# OpenCV refuses more than 2**30 pixels on its own (CV_IO_MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 2**28
OPENCV_MAX_IMAGE_PIXELS = 2**30


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


# -- sizes from file headers -------------------------------------------------------------
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(handle: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header: walk the segments up to it."""
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes
            marker = handle.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of image, start of scan
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # no length follows
            continue
        length = handle.read(2)
        if len(length) < 2:
            return None
        if marker[0] in _JPEG_FRAMES:
            frame = handle.read(5)
            if len(frame) < 5:
                return None
            _, height, width = struct.unpack(">BHH", frame)
            return width, height
        handle.seek(struct.unpack(">H", length)[0] - 2, 1)


def _tiff_size(handle: BinaryIO, order: str) -> tuple[int, int] | None:
    """(width, height) from the first IFD of a classic TIFF (tags 256, 257)."""
    handle.seek(4)
    (offset,) = struct.unpack(order + "I", handle.read(4))
    handle.seek(offset)
    count = handle.read(2)
    if len(count) < 2:
        return None
    size: dict[int, int] = {}
    for _ in range(struct.unpack(order + "H", count)[0]):
        entry = handle.read(12)
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            size[tag] = struct.unpack(order + ("H" if kind == 3 else "I"),
                                      entry[8:10] if kind == 3 else entry[8:12])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) read from the header of a PNG, JPEG, BMP or TIFF file, without
    decoding it; None for another format or a header that cannot be parsed."""
    with open(path, "rb") as handle:
        head = handle.read(32)
        try:
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                return struct.unpack(">II", head[16:24])
            if head[:2] == b"BM" and len(head) >= 26:
                if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 bitmap header
                    return struct.unpack("<HH", head[18:22])
                width, height = struct.unpack("<ii", head[18:26])
                return abs(width), abs(height)  # negative height: rows stored top-down
            if head[:2] == b"\xff\xd8":
                return _jpeg_size(handle)
            if head[:4] in (b"II*\x00", b"MM\x00*"):
                return _tiff_size(handle, "<" if head[:2] == b"II" else ">")
        except struct.error:
            return None
    return None


def check_pixels(path: str | Path, max_pixels: int, what: str = "image") -> None:
    """Refuse (DefectflowError) a file whose header gives more than ``max_pixels`` pixels."""
    try:
        size = header_size(path)
    except OSError as error:
        raise DefectflowError(f"cannot read {what} file ({error.strerror or error})", path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise DefectflowError(
            f"{what} of {size[0]}x{size[1]} pixels is over the limit of {max_pixels} pixels "
            f"(dataset.max_image_pixels): not decoded", path)


def _decode(path: str | Path, flags: int, what: str, max_pixels: int | None = None
            ) -> np.ndarray:
    """Decode an image file with OpenCV; a missing, oversized or undecodable file is an
    error naming it, whatever the decoder raised."""
    path = Path(path)
    if not path.is_file():
        raise DefectflowError(f"{what} file not found", path)
    if max_pixels is not None:
        check_pixels(path, max_pixels, what)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        decoded = cv2.imdecode(data, flags) if data.size else None
    except Exception as error:  # noqa: BLE001 - cv2.error, MemoryError, OSError ...
        text = re.sub(r"\s+", " ", str(error)).strip()[:200]
        raise DefectflowError(f"cannot decode {what} ({type(error).__name__}: {text})",
                              path) from error
    if decoded is None:
        raise DefectflowError(f"cannot decode {what} (corrupt or not an image file)", path)
    return decoded


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """An image as an RGB uint8 array (H, W, 3); grayscale files are repeated to three channels.

    ``max_pixels``: refuse a larger image before decoding it (None: only OpenCV's own
    limit; images of a manifest passed the scan's limit already)."""
    image = _decode(path, cv2.IMREAD_UNCHANGED, "image", max_pixels)
    if image.dtype != np.uint8:  # 16-bit PNG/TIFF: scale to 8 bit
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): any non-zero pixel is defective (masks of other
    values than 0/255 are warned about by the scan, see ``mask_levels``).

    ``expected_hw`` is the (height, width) of the image the mask belongs to; a
    mask of another size is an error naming the mask file.
    """
    return _mask_pixels(path, expected_hw) > 0


def _mask_pixels(path: str | Path, expected_hw: tuple[int, int] | None) -> np.ndarray:
    mask = _decode(path, cv2.IMREAD_GRAYSCALE, "mask", OPENCV_MAX_IMAGE_PIXELS)
    if expected_hw is not None and tuple(mask.shape[:2]) != tuple(expected_hw):
        raise DefectflowError(
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
            f"{expected_hw[1]}x{expected_hw[0]}",
            path,
        )
    return mask


def mask_levels(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The distinct gray values of a mask file (sorted), checked as :func:`read_mask` does.

    Masks are meant to be 0/255; the scan warns about any other value, which
    :func:`read_mask` counts as defective (> 0) all the same."""
    return np.unique(_mask_pixels(path, expected_hw))


def image_header(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int, int]:
    """(width, height, channels) of an image file, decoding it to be sure it is readable;
    an image over ``max_pixels`` pixels (from its header) is refused undecoded."""
    image = _decode(path, cv2.IMREAD_UNCHANGED, "image", max_pixels)
    channels = 1 if image.ndim == 2 else image.shape[2]
    return int(image.shape[1]), int(image.shape[0]), int(channels)
