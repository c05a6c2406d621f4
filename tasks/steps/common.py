"""What the pipeline's steps share: the version in every step's key, a category's rows."""

from __future__ import annotations

import pandas as pd

from ..cache import Ref
from ..images import text_hash

STEP_VERSION = "1"  # bump when a step's output format or meaning changes


def step_key(step: str, *parts) -> str:
    """The content-addressed key of a step's output: its name, STEP_VERSION and its inputs."""
    return text_hash(step, STEP_VERSION, *parts)


def category_rows(patches: Ref, category: str) -> pd.DataFrame:
    """The patch table's rows of one category, renumbered from 0."""
    table = patches.table()
    return table[table["category"] == category].reset_index(drop=True)


def image_paths(manifest: Ref) -> dict[str, str]:
    """Image id -> image file, from the manifest."""
    table = manifest.table()
    return dict(zip(table["image_id"], table["path"]))
