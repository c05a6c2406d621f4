"""The ``elpv`` layout: the ELPV solar-cell images shipped by the ``elpv-dataset`` package.

No source folder: the images are written once as PNG files under
``materialize_dir/elpv/<category>/<index>.png``. The categories are the cell
types ("mono", "poly"); the manifest gets a ``defect_probability`` column.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DefectflowError
from ..candidates import GOOD, Candidate, ScanOptions
from ..files import map_in_threads, write_png_once


def package_root() -> Path:
    """The installed ``elpv-dataset`` package's folder: where the images come from."""
    import elpv_dataset  # see find_candidates

    return Path(elpv_dataset.__file__).parent


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    """The cells of ``options.category`` (default: all), their PNG files under ``root``."""
    # Imported here: it loads all 2,624 cells (~240 MB) and only this layout needs it.
    from elpv_dataset.utils import load_dataset

    category = options.category
    images, probabilities, types = load_dataset()
    types = [str(kind) for kind in types]
    if category is not None and category not in types:
        raise DefectflowError(
            f"ELPV has no category {category!r}; categories: {', '.join(sorted(set(types)))}"
        )

    candidates, writes = [], []
    for index, (image, probability, kind) in enumerate(zip(images, probabilities, types)):
        if category is not None and kind != category:
            continue
        stem = f"{index:04d}"  # the cell's row in the package's labels.csv: stable
        path = root / kind / f"{stem}.png"
        writes.append((path, image))
        probability = float(probability)
        defect_type = GOOD if probability == 0 else f"p{probability:.2f}"
        candidates.append(
            Candidate(
                f"{kind}/{defect_type}/{stem}",
                path,
                int(probability > 0),
                defect_type,
                kind,
                extra={"defect_probability": probability},
            )
        )
    map_in_threads(lambda write: write_png_once(*write), writes)
    return candidates
