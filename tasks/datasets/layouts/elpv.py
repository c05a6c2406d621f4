"""The ``elpv`` layout: the ELPV solar-cell images shipped by the ``elpv-dataset`` package.

No source folder: the images are written once as PNG files under
``materialize_dir/elpv/<category>/<stem>.png``, named as the package names them
(``cell0004.png`` -> image id ``mono/good/cell0004``). The categories are the cell
types ("mono", "poly"); the manifest gets a ``defect_probability`` column and a
``source_path`` column: the package's own file, beside the cache copy in ``path``.
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


def labels_file() -> Path:
    """The package's ``labels.csv``: one line per cell, ``images/cellNNNN.png prob type``."""
    return package_root() / "data" / "labels.csv"


def file_names(labels: Path) -> list[str]:
    """The cells' file names (``images/cell0001.png``, ...) in the order of ``labels.csv``,
    the order in which ``load_dataset`` returns the images."""
    return [line.split()[0] for line in labels.read_text().splitlines() if line.strip()]


def find_candidates(root: Path, options: ScanOptions) -> list[Candidate]:
    """The cells of ``options.category`` (default: all), their PNG files under ``root``."""
    # Imported here: it loads all 2,624 cells (~240 MB) and only this layout needs it.
    from elpv_dataset.utils import load_dataset

    category = options.category
    labels = labels_file()
    names = file_names(labels)
    images, probabilities, types = load_dataset(str(labels))
    types = [str(kind) for kind in types]
    if category is not None and category not in types:
        raise DefectflowError(
            f"ELPV has no category {category!r}; categories: {', '.join(sorted(set(types)))}"
        )

    candidates, writes = [], []
    if len(names) != len(images):
        raise DefectflowError(f"{len(names)} lines but {len(images)} images", labels)
    for name, image, probability, kind in zip(names, images, probabilities, types):
        if category is not None and kind != category:
            continue
        stem = Path(name).stem  # the package's own file name: traceable to the source
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
                extra={"defect_probability": probability,
                       "source_path": str(labels.parent / name)},
            )
        )
    map_in_threads(lambda write: write_png_once(*write), writes)
    return candidates
