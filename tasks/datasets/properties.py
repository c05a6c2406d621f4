"""Image properties of a manifest's images, and clusters of images alike in them.

Brightness, colourfulness and edge density per image, and KMeans clusters on
these (``property_table``): a description of what a dataset holds, apart from
scanning it.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd

from ..errors import DefectflowError
from ..images import read_image
from .files import map_in_threads
from .manifest import require_columns

_PROPERTY_COLUMNS = ("brightness", "colourfulness", "edge_density")

# Fixed Canny thresholds, so edge densities compare across images and datasets.
_CANNY_LOW, _CANNY_HIGH = 100, 200

# Silhouette costs O(n^2); above this many images it is estimated on a sample.
_SILHOUETTE_SAMPLE = 2000


def image_properties(image: np.ndarray) -> tuple[float, float, float]:
    """(brightness, colourfulness, edge_density) of an RGB uint8 image.

    brightness: mean gray level, 0-255. colourfulness: the Hasler–Süsstrunk
    metric (0 for gray images). edge_density: share of pixels that Canny
    (thresholds 100/200) marks as edges.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    red, green, blue = (image[:, :, channel].astype(np.float64) for channel in range(3))
    red_green = red - green
    yellow_blue = 0.5 * (red + green) - blue
    colourfulness = math.hypot(red_green.std(), yellow_blue.std()) + 0.3 * math.hypot(
        red_green.mean(), yellow_blue.mean()
    )
    edges = cv2.Canny(gray, _CANNY_LOW, _CANNY_HIGH)
    return float(gray.mean()), float(colourfulness), float(np.count_nonzero(edges) / edges.size)


def _downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def property_table(
    manifest: pd.DataFrame, n_clusters: int | None = None, seed: int = 0, max_side: int = 256
) -> pd.DataFrame:
    """Per image: brightness, colourfulness, edge density, and a cluster of images alike in these.

    Images are first downscaled to at most ``max_side`` pixels a side (edge
    density therefore describes the image at that scale). The clusters come
    from KMeans (scikit-learn, ``n_init=10``, seeded) on the standardized
    properties, over all rows of ``manifest`` (pass one category's rows to
    cluster a category alone). They are numbered by mean brightness, darkest
    first, so the numbering does not depend on KMeans' arbitrary labels.

    ``n_clusters`` None picks k in 2..6 by the best silhouette score, trying
    only k with at least two distinct images per cluster; with fewer than
    four distinct images every image is in cluster 0.

    Returns columns ``image_id, category, brightness, colourfulness,
    edge_density, property_cluster`` in the manifest's row order.
    """
    require_columns(manifest, ("image_id", "category", "path"))
    if n_clusters is not None and n_clusters < 1:
        raise DefectflowError(f"n_clusters must be at least 1, got {n_clusters}")

    def properties_of(path: str) -> tuple[float, float, float]:
        return image_properties(_downscale(read_image(path), max_side))

    features = np.array(map_in_threads(properties_of, manifest["path"]), dtype=np.float64)
    features = features.reshape(-1, len(_PROPERTY_COLUMNS))  # keeps the shape when empty
    table = pd.DataFrame(
        {"image_id": manifest["image_id"].to_numpy(), "category": manifest["category"].to_numpy()}
    )
    table[list(_PROPERTY_COLUMNS)] = features
    table["property_cluster"] = _property_clusters(features, n_clusters, seed)
    return table


def _property_clusters(features: np.ndarray, n_clusters: int | None, seed: int) -> np.ndarray:
    """KMeans cluster of each row of ``features`` (see :func:`property_table`)."""
    # Imported here: scikit-learn is slow to import and scanning never needs it.
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    if len(features) == 0:
        return np.zeros(0, dtype=np.int64)
    scaled = StandardScaler().fit_transform(features)
    # KMeans cannot make more clusters than there are distinct points.
    n_distinct = len(np.unique(scaled.round(12), axis=0))

    def fit(k: int) -> np.ndarray:
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(scaled)

    if n_clusters is None:
        best_score, labels = -np.inf, np.zeros(len(features), dtype=np.int64)
        for k in range(2, min(6, n_distinct // 2) + 1):
            candidate = fit(k)
            sample = _SILHOUETTE_SAMPLE if len(features) > _SILHOUETTE_SAMPLE else None
            score = silhouette_score(scaled, candidate, sample_size=sample, random_state=seed)
            if score > best_score:
                best_score, labels = score, candidate
    elif n_clusters == 1:
        labels = np.zeros(len(features), dtype=np.int64)
    elif n_clusters > n_distinct:
        raise DefectflowError(f"n_clusters={n_clusters} exceeds the {n_distinct} distinct images")
    else:
        labels = fit(n_clusters)

    # Renumber by mean brightness (column 0), darkest first: a stable, readable numbering.
    clusters = np.unique(labels)
    order = sorted(clusters, key=lambda cluster: features[labels == cluster, 0].mean())
    renumber = {int(cluster): rank for rank, cluster in enumerate(order)}
    return np.array([renumber[int(label)] for label in labels], dtype=np.int64)
