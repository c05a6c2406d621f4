"""Feature sources: one backbone's store, or the heterogeneous ensemble's combined store.

``feature_store`` is what the pipeline's feature step and the scoring of new images call.
With single-backbone settings it is ``features.extract_features`` itself (same keys, same
files). With ``features.sources`` (thesis 004, 2.1) it builds

1. each network's own content-addressed store (``extract_features`` with that network's
   settings): adding a network to a set reuses the stores of the others;
2. the transformation block (``feature_transform``), fitted on the training rows only and
   cached under ``<cache_dir>/transforms/<key>/`` (key: the member stores, the training
   rows, the block, the channels and the grid) — or, scoring new images, the one the model
   was trained with;
3. the combined store ``<cache_dir>/features/<key>/combined.npy`` (key: the member stores
   and the transform's content), one layer (``COMBINED_LAYER``) that PatchCore, PaDiM and the
   discriminator read like any backbone layer. The transform is kept beside it
   (``TRANSFORM_NAME``) so that the models trained on it can carry it.

A source ``{backbone: cutpaste, layers: [...]}`` reads the encoder CutPaste trained in this
run (``methods.cutpaste_encoder``): its file (``encoder``) is the member's network, its
CutPaste model key is in the member's store key, and it is kept beside the combined store
too (``ENCODER_FILE``), for the models to carry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from . import cores
from .cache import allocated_memmap, cached_folder
from .errors import DefectflowError
from .feature_settings import COMBINED_LAYER, FeatureSettings
from .feature_transform import TRANSFORM_NAME, FeatureTransform, fit_transform, to_grid
from .features import FeatureStoreRef, extract_features, open_store
from .images import text_hash
from .methods.cutpaste_encoder import (ENCODER_FILE, ENCODER_SOURCE, encoder_layers,
                                       encoder_network, pretrained_channels)

CHUNK = 32  # images per chunk while fitting and combining: bounds the float32 working maps


def feature_store(patch_table: pd.DataFrame, manifest: pd.DataFrame,
                  settings: FeatureSettings, *, mean, std, cache_dir: str | Path,
                  progress: bool = True, denoise: dict | None = None,
                  train: np.ndarray | None = None,
                  transform: str | Path | None = None,
                  encoder: str | Path | None = None) -> FeatureStoreRef:
    """The feature store the detectors read for ``patch_table``.

    Combined settings need either ``train`` (a boolean mask of the rows the transform is
    fitted on) or ``transform`` (a saved transform, e.g. a registered model's); a
    ``cutpaste`` source needs ``encoder``, the file of the encoder CutPaste trained.
    """
    if not settings.combined:
        return extract_features(patch_table, manifest, settings, mean=mean, std=std,
                                cache_dir=cache_dir, progress=progress, denoise=denoise)
    members = [extract_features(patch_table, manifest, settings.source_settings(source),
                                mean=mean, std=std, cache_dir=cache_dir, progress=progress,
                                denoise=denoise, network=_network(source, i, encoder))
               for i, source in enumerate(settings.sources)]
    if transform is not None:
        fitted = FeatureTransform.load(transform)
        if fitted.source_channels != tuple(_channels(m) for m in members):
            raise DefectflowError("the feature transform was fitted on other sources than "
                                  "features.sources give", transform)
    elif train is not None:
        fitted = _fitted_transform(members, settings, np.asarray(train, bool), cache_dir)
    else:
        raise ValueError("combined feature settings need the training rows or a transform")
    uses_encoder = any(s.backbone == ENCODER_SOURCE for s in settings.sources)
    return _combined_store(members, fitted, patch_table, cache_dir,
                           encoder if uses_encoder else None)


def _network(source, index: int, encoder: str | Path | None):
    """The trained network a source reads (CutPaste's encoder), None for a named backbone."""
    if source.backbone != ENCODER_SOURCE:
        return None
    if encoder is None:
        raise DefectflowError(f"features.sources[{index}] reads the encoder {ENCODER_SOURCE} "
                              "trained, but none was given (a model folder without "
                              f"{ENCODER_FILE}?)")
    return encoder_network(encoder)


def carried_files(store: FeatureStoreRef) -> list[Path]:
    """What a model trained on ``store`` must carry to score new images the same way: a
    combined store's transform, and the trained encoder when a source read one."""
    folder = Path(store.directory)
    return [folder / name for name in (TRANSFORM_NAME, ENCODER_FILE)
            if (folder / name).is_file()]


def _channels(store: FeatureStoreRef) -> int:
    return sum(int(store.maps(layer).shape[1]) for layer in store.layers)


def _grid(store: FeatureStoreRef) -> tuple[int, int]:
    """The common grid: the first source's first layer's."""
    return tuple(int(v) for v in store.maps(store.layers[0]).shape[-2:])


def _source_chunks(members: list[FeatureStoreRef], positions: np.ndarray,
                   grid: tuple[int, int]) -> Iterator[tuple[np.ndarray, list]]:
    """(row positions, each source's maps on ``grid``) per ``CHUNK`` rows."""
    arrays = [[m.maps(layer) for layer in m.layers] for m in members]
    for start in range(0, len(positions), CHUNK):
        cores.follow()  # the current share of the cores, when steps run side by side
        rows = positions[start:start + CHUNK]
        # Sorted, contiguous reads from the memory-mapped stores.
        yield rows, [to_grid((a[rows] for a in layers), grid) for layers in arrays]


def _fitted_transform(members: list[FeatureStoreRef], settings: FeatureSettings,
                      train: np.ndarray, cache_dir: str | Path) -> FeatureTransform:
    grid = _grid(members[0])
    positions = np.flatnonzero(train)
    key = text_hash("transform-v1", *(m.key for m in members), settings.combine,
                    settings.channels, grid, text_hash(positions.tobytes()))
    with cached_folder(cache_dir, "transforms", key) as out:
        if out.missing:
            chunks = (parts for _, parts in _source_chunks(members, positions, grid))
            fit_transform(settings.combine, settings.channels, grid,
                          [_channels(m) for m in members],
                          [s.backbone for s in settings.sources],
                          chunks).save(out.partial / TRANSFORM_NAME)
    return FeatureTransform.load(out.path / TRANSFORM_NAME)


def _combined_store(members: list[FeatureStoreRef], fitted: FeatureTransform,
                    patch_table: pd.DataFrame, cache_dir: str | Path,
                    encoder: str | Path | None) -> FeatureStoreRef:
    key = text_hash("combined-v1", *(m.key for m in members), fitted.digest())
    found = open_store(cache_dir, key)
    if found is not None:
        return found
    count = len(patch_table)
    with cached_folder(cache_dir, "features", key) as out:
        if out.missing:
            combined = allocated_memmap(out.partial / f"{COMBINED_LAYER}.npy", np.float16,
                                        (count, fitted.channels, *fitted.grid))
            for rows, parts in _source_chunks(members, np.arange(count), fitted.grid):
                combined[rows] = fitted.apply(parts).numpy().astype(np.float16)
            combined.flush()
            del combined
            fitted.save(out.partial / TRANSFORM_NAME)
            if encoder is not None:  # its CutPaste model key is in a member's key, so in ours
                shutil.copy2(encoder, out.partial / ENCODER_FILE)
            patch_table[["patch_id", "image_id"]].to_parquet(out.partial / "patches.parquet")
            (out.partial / "meta.json").write_text(json.dumps(
                {"key": key, "layers": [COMBINED_LAYER], "count": count,
                 "sources": [m.key for m in members], "combine": fitted.combine,
                 "channels": fitted.channels, "grid": list(fitted.grid)}, indent=1))
    return open_store(cache_dir, key)


def check_sources(settings: FeatureSettings, where: str | None = None,
                  cutpaste=None) -> None:
    """Before any work: every source names a known backbone and its layers, its weights are
    on this machine (nothing is downloaded), and ``channels`` fits what each PCA is given.
    Each failure is one DefectflowError naming the setting (``where``: the params file).
    ``cutpaste``: the CutPaste settings a ``cutpaste`` source's encoder is trained with."""
    from .backbones import available_layers, load_backbone

    channels = []
    for i, source in enumerate(settings.sources):
        name = f"features.sources[{i}]"
        if source.backbone == ENCODER_SOURCE:
            channels.append(_check_encoder_source(source, name, cutpaste, where))
            continue
        try:
            layers = available_layers(source.backbone)
        except DefectflowError as exc:
            raise DefectflowError(f"{name}.backbone: {exc.problem}", where) from None
        unknown = [layer for layer in source.layers if layer not in layers]
        if unknown:
            raise DefectflowError(f"{name}.layers: unknown layer(s) {unknown} for backbone "
                                  f"{source.backbone!r} (valid: {layers})", where)
        try:  # loads the weights: missing files fail here, before any extraction
            backbone = load_backbone(source.backbone, source.layers, device="cpu")
        except DefectflowError as exc:
            raise DefectflowError(f"{name}.backbone: {exc}", where) from None
        channels.append(sum(backbone.layer_channels.values()))
    wanted = settings.channels
    if wanted is None:
        return
    if settings.combine == "global" and wanted > sum(channels):
        raise DefectflowError(f"features.channels: {wanted} is more than the {sum(channels)} "
                              "channels the sources give together", where)
    for i, (source, count) in enumerate(zip(settings.sources, channels)):
        if settings.combine == "individual" and wanted > count:
            raise DefectflowError(f"features.channels: {wanted} is more than the {count} "
                                  f"channels of features.sources[{i}] ({source.backbone} "
                                  f"{list(source.layers)}) for the individual block", where)


def _check_encoder_source(source, name: str, cutpaste, where: str | None) -> int:
    """A ``cutpaste`` source's layers are stages of CutPaste's encoder; its channels."""
    if cutpaste is None:
        raise ValueError("a cutpaste source is checked with the CutPaste settings")
    layers = encoder_layers(cutpaste)
    unknown = [layer for layer in source.layers if layer not in layers]
    if unknown:
        raise DefectflowError(f"{name}.layers: unknown layer(s) {unknown} for the "
                              f"{ENCODER_SOURCE} encoder {cutpaste.encoder!r} (methods."
                              f"{ENCODER_SOURCE}.encoder; valid: {layers})", where)
    try:  # CutPaste starts from ImageNet weights: missing files fail here
        return pretrained_channels(cutpaste, source.layers)
    except DefectflowError as exc:
        raise DefectflowError(f"{name}.backbone: {exc}", where) from None
