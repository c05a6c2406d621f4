"""Scoring an inbox folder of new images: every image once, none lost.

For each image file directly in the inbox (suffixes of ``images.IMAGE_SUFFIXES``):

- unreadable, over the pixel limit (``images.MAX_IMAGE_PIXELS``, read from the header
  before decoding) or failing in the scorer on its own -> moved to ``<inbox>/quarantine/``
  beside ``<name>.reason.txt``; the other images of the batch are scored all the same;
- sent again (same name and content as an image already in ``done/``) -> moved to
  ``done/`` under a free name and counted as a duplicate (``n_duplicates``), not scored:
  its row is the first one's;
- readable   -> scored; ``<out>/maps/<stem>.npy`` (float32 anomaly map at the
  image's resolution) and ``<out>/overlays/<stem>.png`` are written, a row is
  appended to ``<out>/results.csv``, and only then the image is moved to
  ``<inbox>/done/``.

Crash safety: outputs are written to temporary names and renamed into place,
the results row is flushed to disk before the image moves, and a file is never
overwritten (a name already taken gets a ``-1``, ``-2``... suffix). An image
whose name and content hash are already in results.csv (a crash between the
row and the move, so the row's ``done`` file is not there) is moved to done/ without being
scored again. A lock file
in ``<out>`` keeps two overlapping batches (a slow run and the next scheduled
one) from scoring the same inbox at once.

Plain Python: the scorer is any callable ``list of paths -> DataFrame`` with
``score``, ``threshold``, ``verdict`` and ``anomaly_map`` columns (the MLflow
pyfunc's ``predict``), so this module imports neither MLflow nor Prefect.
"""

from __future__ import annotations

import csv
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DefectflowError
from ..images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, file_hash, read_image

RESULT_COLUMNS = ["image", "score", "threshold", "verdict", "model", "model_version", "time",
                  "sha256", "map", "overlay", "done"]
DONE, QUARANTINE = "done", "quarantine"
CHUNK = 32  # images scored per scorer call: bounds the anomaly maps held in memory


@dataclass
class InboxBatch:
    """What one pass over the inbox did."""

    rows: list[dict] = field(default_factory=list)         # results.csv rows written now
    quarantined: list[dict] = field(default_factory=list)  # {"image", "reason", "moved_to"}
    recovered: list[str] = field(default_factory=list)     # scored before a crash, now moved
    # sent again, already in done/: {"image", "sha256", "moved_to", "first_done"}
    duplicates: list[dict] = field(default_factory=list)
    busy: bool = False                                     # another batch held the lock

    @property
    def counts(self) -> dict[str, int]:
        return {"n_scored": len(self.rows), "n_quarantined": len(self.quarantined),
                "n_defective": sum(r["verdict"] == "defective" for r in self.rows),
                "n_recovered": len(self.recovered), "n_duplicates": len(self.duplicates)}


def pending_images(inbox: str | Path) -> list[Path]:
    """Image files directly in the inbox, by name (done/ and quarantine/ are not looked into).

    Other suffixes are left alone, so a file still being copied under a temporary name
    (``x.png.part``) is picked up only once it is renamed to ``x.png``.
    """
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise DefectflowError("inbox folder not found", inbox)
    return sorted(p for p in inbox.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def free_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/<stem>-<n><suffix>`` with the first free n: never overwrite."""
    candidate = folder / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{suffix}"
    return candidate


def _move(path: Path, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    target = free_path(folder, path.name)
    # os.rename within the inbox's file system: atomic, never a half-copied file.
    os.rename(path, target)
    return target


def _output_stem(out: Path, stem: str) -> str:
    """A stem free in both maps/ and overlays/, so an earlier image's outputs stay."""
    n, candidate = 0, stem
    while (out / "maps" / f"{candidate}.npy").exists() or \
            (out / "overlays" / f"{candidate}.png").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _write_atomic_npy(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, array)
    os.replace(partial, path)


def _append_row(results: Path, row: dict) -> None:
    new = not results.exists() or results.stat().st_size == 0
    with open(results, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())  # the row is on disk before the image leaves the inbox


def _scored_before(results: Path) -> dict[tuple[str, str], str]:
    """(image name, sha256) -> the ``done`` path of its row in results.csv."""
    if not results.exists() or results.stat().st_size == 0:
        return {}
    table = pd.read_csv(results, usecols=["image", "sha256", "done"], dtype=str)
    return dict(zip(zip(table["image"], table["sha256"]), table["done"]))


def _quarantine(path: Path, inbox: Path, problem: str, batch: InboxBatch) -> None:
    moved = _move(path, inbox / QUARANTINE)
    reason = moved.with_name(moved.name + ".reason.txt")
    reason.write_text(f"{path.name}: {problem}\n")
    batch.quarantined.append({"image": path.name, "reason": problem, "moved_to": str(moved)})


class _Lock:
    """An exclusive, non-blocking lock on ``<out>/.score.lock`` (released when the process dies)."""

    def __init__(self, out: Path):
        self.path = out / ".score.lock"
        self.handle = None

    def __enter__(self) -> bool:
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        self.handle.close()


def score_inbox(inbox: str | Path, out: str | Path,
                scorer: Callable[[list[str]], pd.DataFrame], model: str, model_version: str,
                map_vmax: float | None = None) -> InboxBatch:
    """Score every new image of ``inbox`` once (see the module docstring); returns what was done."""
    inbox, out = Path(inbox), Path(out)
    files = pending_images(inbox)
    for folder in ("maps", "overlays"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    batch = InboxBatch()
    with _Lock(out) as locked:
        if not locked:
            batch.busy = True
            return batch
        results = out / "results.csv"
        seen = _scored_before(results)
        readable: list[tuple[Path, str]] = []
        for path in files:
            if not path.exists():  # taken by someone else since the listing
                continue
            try:
                read_image(path, MAX_IMAGE_PIXELS)  # bounded from the header, then decoded
            except DefectflowError as exc:  # every decoder error arrives as one
                _quarantine(path, inbox, exc.problem, batch)
                continue
            digest = file_hash(path)
            if (path.name, digest) in seen:
                first_done = seen[(path.name, digest)]
                sent_again = Path(first_done).is_file()  # asked before this one moves there
                moved = _move(path, inbox / DONE)
                if sent_again:  # the first copy is in done/
                    batch.duplicates.append({"image": path.name, "sha256": digest,
                                             "moved_to": str(moved), "first_done": first_done})
                else:  # its row was written before a crash, the move never happened
                    batch.recovered.append(path.name)
                continue
            readable.append((path, digest))
        for start in range(0, len(readable), CHUNK):
            chunk = readable[start:start + CHUNK]
            for (path, digest), result in _score_chunk(scorer, chunk, inbox, batch):
                batch.rows.append(_record(path, digest, result, inbox, out, results, model,
                                          model_version, map_vmax))
    return batch


def _score_chunk(scorer: Callable[[list[str]], pd.DataFrame], chunk: list[tuple[Path, str]],
                 inbox: Path, batch: InboxBatch) -> list[tuple[tuple[Path, str], object]]:
    """(image, result row) of every image of ``chunk`` the scorer scores.

    When the chunk fails on bad input, each image is scored on its own: one that still
    fails with a DefectflowError (its own input) is quarantined with the reason and the
    others are scored. Any other error (the model, the machine) stops the batch and leaves
    the images in the inbox for the next one."""
    try:
        scored = scorer([str(p) for p, _ in chunk])
        return list(zip(chunk, scored.itertuples(index=False)))
    except DefectflowError:
        if len(chunk) == 1:
            raise
    done = []
    for item in chunk:
        try:
            done.extend(_score_chunk(scorer, [item], inbox, batch))
        except DefectflowError as exc:
            _quarantine(item[0], inbox, exc.problem, batch)
    return done


def _record(path: Path, digest: str, result, inbox: Path, out: Path, results: Path,
            model: str, model_version: str, map_vmax: float | None) -> dict:
    """Write one image's map and overlay, append its row, then move it to done/."""
    # matplotlib: loaded once an image is scored
    from ..evaluation import overlay_title, save_overlay

    stem = _output_stem(out, path.stem)
    anomaly_map = np.asarray(result.anomaly_map, dtype=np.float32)
    map_path = out / "maps" / f"{stem}.npy"
    _write_atomic_npy(map_path, anomaly_map)
    overlay_path = out / "overlays" / f"{stem}.png"
    partial = overlay_path.with_name(f"{stem}.partial.png")
    shown = np.nan_to_num(anomaly_map, nan=0.0)  # NaN: pixels no patch covered
    save_overlay(read_image(path), None, shown, partial,
                 title=overlay_title(f"{model} v{model_version}", path.name, None,
                                     float(result.score), float(result.threshold)),
                 vmin=0.0 if map_vmax is not None and shown.min() >= 0 else None,
                 vmax=map_vmax)
    os.replace(partial, overlay_path)
    (inbox / DONE).mkdir(exist_ok=True)
    done = free_path(inbox / DONE, path.name)
    row = {"image": path.name, "score": float(result.score),
           "threshold": float(result.threshold), "verdict": result.verdict, "model": model,
           "model_version": model_version,
           "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "sha256": digest, "map": str(map_path.relative_to(out)),
           "overlay": str(overlay_path.relative_to(out)), "done": str(done)}
    _append_row(results, row)
    os.rename(path, done)  # last: a crash before this leaves the image in the inbox
    return row


def read_results(out: str | Path) -> pd.DataFrame:
    """``<out>/results.csv`` (empty with the columns when nothing was scored yet)."""
    path = Path(out) / "results.csv"
    if not path.exists():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.read_csv(path)
