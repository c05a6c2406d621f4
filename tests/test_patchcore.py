"""Feature store, coreset and PatchCore on tiny generated images."""

import numpy as np
import pandas as pd
import pytest

from defectflow.tasks import datasets, features as features_mod
from defectflow.tasks.coreset import greedy_coreset
from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.methods import PatchCore, PatchSet
from defectflow.tasks.methods.patchcore import PatchCoreParams
from defectflow.tasks.normalization import channel_stats
from defectflow.tasks.patches import plan_patches

LAYERS = ("blocks.2", "blocks.4")


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 50, size=(8, 16))
    points = np.concatenate([c + rng.normal(0, 0.1, size=(500, 16)) for c in centers])
    picked = greedy_coreset(points.astype(np.float32), ratio=8 / len(points), projection_dim=8)
    assert len(picked) == 8
    assert sorted(set(picked // 500)) == list(range(8))  # one point from every cluster


def test_chunked_coreset_keeps_the_ratio_and_stays_in_range():
    points = np.random.default_rng(1).normal(size=(10_000, 32)).astype(np.float32)
    picked = greedy_coreset(points, ratio=0.05, chunk_size=3000)
    assert abs(len(picked) - 500) <= 4
    assert picked.min() >= 0 and picked.max() < len(points) and len(set(picked)) == len(picked)


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from conftest import prepared_product

    manifest, patches, paths, stats = prepared_product(
        tmp_path_factory.mktemp("data") / "product")
    return manifest, patches, paths, stats


def test_feature_store_is_written_once_and_reused(product, tmp_path, monkeypatch):
    manifest, patches, _, stats = product
    kwargs = dict(backbone="efficientnet_lite0", layers=LAYERS, input_size=64, mean=stats["mean"],
                  std=stats["std"], cache_dir=tmp_path, progress=False)
    ref = features_mod.extract_features(patches, manifest, **kwargs)
    maps = ref.maps("blocks.2")
    assert maps.dtype == np.float16 and isinstance(maps, np.memmap)
    assert maps.shape == (len(patches), 40, 8, 8)
    assert ref.patch_ids() == patches["patch_id"].tolist()

    import defectflow.tasks.backbones as backbones

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran again for a cached key")

    monkeypatch.setattr(backbones, "load_backbone", forbidden)
    again = features_mod.extract_features(patches, manifest, **kwargs)
    assert again == ref
    # A different input size is another key, so it must compute (and hits the guard).
    with pytest.raises(AssertionError):
        features_mod.extract_features(patches, manifest, **{**kwargs, "input_size": 96})


def test_patchcore_separates_generated_defects_and_localizes_them(product, tmp_path):
    manifest, patches, paths, stats = product
    store = features_mod.extract_features(
        patches, manifest, backbone="efficientnet_lite0", layers=LAYERS, input_size=64,
        mean=stats["mean"], std=stats["std"], cache_dir=tmp_path, progress=False)

    def subset(splits):
        pos = np.flatnonzero(patches["split"].isin(splits).to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, 64,
                        tuple(stats["mean"]), tuple(stats["std"]))

    detector = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25)).fit(subset(["train"]))
    n_train_vectors = (patches.split == "train").sum() * 8 * 8
    assert len(detector.memory_bank) == pytest.approx(0.25 * n_train_vectors, abs=2)
    test = subset(["test"])
    scores, maps = detector.score(test)
    assert maps.shape == (len(test), 64, 64)
    labels = test.table["label"].to_numpy()
    assert image_metrics(labels, scores, float(np.median(scores)))["image_auroc"] >= 0.95

    from defectflow.tasks.images import read_mask
    import cv2

    masks, defect_maps = [], []
    for row, amap in zip(test.table.itertuples(), maps):
        mask_path = manifest.set_index("image_id").loc[row.image_id, "mask_path"]
        if isinstance(mask_path, str):
            masks.append(cv2.resize(read_mask(mask_path).astype(np.uint8), (64, 64),
                                    interpolation=cv2.INTER_NEAREST) > 0)
            defect_maps.append(amap)
    assert pixel_metrics(masks, defect_maps)["pixel_auroc"] >= 0.85

    # save/load round trip gives the same scores
    restored = PatchCore.load(detector.save(tmp_path / "model"))
    np.testing.assert_allclose(restored.score(test)[0], scores, rtol=1e-5)


def test_patchcore_params_reject_bad_values():
    with pytest.raises(ValueError):
        PatchCoreParams(coreset_ratio=0)
    with pytest.raises(ValueError):
        PatchCoreParams(smoothing_sigma=-1)


def test_hnsw_search_agrees_with_exact_search(product, tmp_path):
    manifest, patches, paths, stats = product
    store = features_mod.extract_features(
        patches, manifest, backbone="efficientnet_lite0", layers=LAYERS, input_size=64,
        mean=stats["mean"], std=stats["std"], cache_dir=tmp_path, progress=False)
    pos = np.flatnonzero((patches["split"] == "train").to_numpy())
    train = PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, 64,
                     tuple(stats["mean"]), tuple(stats["std"]))
    test_pos = np.flatnonzero((patches["split"] == "test").to_numpy())
    test = PatchSet(patches.iloc[test_pos].reset_index(drop=True), store, test_pos, paths, 64,
                    tuple(stats["mean"]), tuple(stats["std"]))
    exact = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25)).fit(train)
    approx = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25, search="hnsw"))
    approx.memory_bank = exact.memory_bank
    np.testing.assert_allclose(approx.score(test)[0], exact.score(test)[0], rtol=0.05)
