"""Feature store, coreset and PatchCore on tiny generated images."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from defectflow.tasks.feature_settings import FeatureSettings
from defectflow.tasks import datasets, features as features_mod
from defectflow.tasks.coreset import greedy_coreset
from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.methods import PatchCore, PatchSet
from defectflow.tasks.methods.cell_search import CELLS_FILE
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
    settings = FeatureSettings(layers=LAYERS, input_size=64)
    kwargs = dict(mean=stats["mean"], std=stats["std"], cache_dir=tmp_path, progress=False)
    ref = features_mod.extract_features(patches, manifest, settings, **kwargs)
    maps = ref.maps("blocks.2")
    assert maps.dtype == np.float16 and isinstance(maps, np.memmap)
    assert maps.shape == (len(patches), 40, 8, 8)
    assert ref.patch_ids() == patches["patch_id"].tolist()

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran again for a cached key")

    monkeypatch.setattr(features_mod, "_write_feature_maps", forbidden)
    again = features_mod.extract_features(patches, manifest, settings, **kwargs)
    assert again == ref
    # A different input size is another key, so it must compute (and hits the guard).
    with pytest.raises(AssertionError):
        features_mod.extract_features(patches, manifest,
                                      dataclasses.replace(settings, input_size=96), **kwargs)


def test_patchcore_separates_generated_defects_and_localizes_them(product, tmp_path):
    manifest, patches, paths, stats = product
    store = features_mod.extract_features(
        patches, manifest, FeatureSettings(layers=LAYERS, input_size=64),
        mean=stats["mean"], std=stats["std"], cache_dir=tmp_path, progress=False)

    def subset(splits):
        pos = np.flatnonzero(patches["split"].isin(splits).to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, 64,
                        tuple(stats["mean"]), tuple(stats["std"]))

    detector = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25)).fit(subset(["train"]))
    n_train_vectors = (patches.split == "train").sum() * 8 * 8
    assert 0 < detector.fit_seconds["coreset"] <= detector.fit_seconds["total"]
    assert len(detector.memory_bank) == pytest.approx(0.25 * n_train_vectors, abs=2)
    test = subset(["test"])
    scores, maps = detector.score(test)
    assert maps.shape == (len(test), 64, 64)
    labels = test.table["label"].to_numpy()
    assert image_metrics(labels, scores, float(np.median(scores)))["image_auroc"] >= 0.95
    # The GPU scoring path (torch search and map blur on the features' device), run here on
    # the CPU under another device name: the same scores and maps as faiss and scipy.
    gpu_path_scores, gpu_path_maps = detector.score(dataclasses.replace(test, device="cpu:0"))
    assert type(detector.exact_index).__name__ == "TorchFlatIndex"
    np.testing.assert_allclose(gpu_path_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(gpu_path_maps, maps, rtol=1e-4, atol=1e-5 * maps.max())
    assert detector.score(test)[0].tolist() == scores.tolist()   # back on faiss

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


@pytest.mark.parametrize("search", ["hnsw", "ivf"])
def test_approximate_search_agrees_with_exact_search(product, tmp_path, search):
    manifest, patches, paths, stats = product
    store = features_mod.extract_features(
        patches, manifest, FeatureSettings(layers=LAYERS, input_size=64),
        mean=stats["mean"], std=stats["std"], cache_dir=tmp_path, progress=False)
    pos = np.flatnonzero((patches["split"] == "train").to_numpy())
    train = PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, 64,
                     tuple(stats["mean"]), tuple(stats["std"]))
    test_pos = np.flatnonzero((patches["split"] == "test").to_numpy())
    test = PatchSet(patches.iloc[test_pos].reset_index(drop=True), store, test_pos, paths, 64,
                    tuple(stats["mean"]), tuple(stats["std"]))
    exact = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25)).fit(train)
    approx = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25, search=search))
    approx.memory_bank = exact.memory_bank
    exact_scores = exact.score(test)[0]
    np.testing.assert_allclose(approx.score(test)[0], exact_scores, rtol=0.05)
    if search == "ivf":
        # Probing every cell is an exact search.
        every = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25, search="ivf",
                                          ivf_lists=4, ivf_probe=4))
        every.memory_bank = exact.memory_bank
        np.testing.assert_allclose(every.score(test)[0], exact_scores, rtol=1e-5)
        # One cell probed of 16: the image scores still match exact search, since each
        # image's worst patches are searched again exactly; the maps do not (some patches'
        # neighbours are missed), and without the exact pass the scores do not either.
        coarse = PatchCore(PatchCoreParams(layers=LAYERS, coreset_ratio=0.25, search="ivf",
                                           ivf_lists=16, ivf_probe=1, exact_top=8))
        coarse.memory_bank = exact.memory_bank
        coarse_scores, coarse_maps = coarse.score(test)
        np.testing.assert_allclose(coarse_scores, exact_scores, rtol=1e-5)
        assert not np.allclose(coarse_maps, exact.score(test)[1], rtol=1e-3)
        bare = PatchCore(dataclasses.replace(coarse.params, exact_top=0))
        bare.memory_bank = exact.memory_bank
        assert (bare.score(test)[0] > exact_scores * (1 + 1e-4)).any()
        # The cells are saved with the model and searched as they were.
        restored = PatchCore.load(coarse.save(tmp_path / "ivf"))
        assert (tmp_path / "ivf" / CELLS_FILE).is_file()
        np.testing.assert_array_equal(restored.index.order, coarse.index.order)
        np.testing.assert_array_equal(restored.score(test)[1], coarse_maps)


def test_vectorized_greedy_picks_what_the_textbook_greedy_picks():
    import torch

    from defectflow.tasks.coreset import _greedy

    points = np.random.default_rng(2).normal(size=(300, 12)).astype(np.float32)
    picked = _greedy(torch.from_numpy(points), 25, start=7)
    # Textbook k-center greedy: full distances, the farthest point from the set each step.
    expected, nearest = [7], np.linalg.norm(points - points[7], axis=1)
    for _ in range(24):
        expected.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, np.linalg.norm(points - points[expected[-1]], axis=1))
    assert picked.tolist() == expected


def test_prefetch_keeps_order_and_raises_the_producers_error():
    from defectflow.tasks.features import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("image 2 is broken")

    got = []
    with pytest.raises(ValueError, match="image 2 is broken"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]
    # Stopping early ends the producer thread instead of leaving it blocked.
    import threading

    for item in prefetch(iter(range(1000)), depth=1):
        break
    assert not any(t.name == "defectflow-prefetch" for t in threading.enumerate())


def test_normalize_batch_matches_preprocess_and_is_channels_last():
    import torch

    from defectflow.tasks.features import normalize_batch, preprocess, resize

    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8) for _ in range(3)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = np.stack([preprocess(c, 64, mean, std) for c in crops])
    got = normalize_batch(np.stack([resize(c, 64) for c in crops]), mean, std, "cpu")
    assert got.shape == (3, 3, 64, 64) and got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_border_pooling_changes_only_the_border_and_is_validated():
    from defectflow.tasks.methods.patchcore import embed

    rng = np.random.default_rng(4)
    maps = {"a": rng.normal(size=(2, 5, 8, 8)).astype(np.float32),
            "b": rng.normal(size=(2, 7, 4, 4)).astype(np.float32)}
    valid = embed(maps, ("a", "b"), "valid").numpy()
    padded = embed(maps, ("a", "b"), "zero_padded").numpy()
    assert valid.shape == padded.shape == (2, 8, 8, 12)
    # The shallow layer's interior cells see no padding: identical there.
    np.testing.assert_allclose(padded[:, 1:-1, 1:-1, :5], valid[:, 1:-1, 1:-1, :5], rtol=1e-6)
    # A corner averages 4 real cells: zero padding scales it by 4/9.
    np.testing.assert_allclose(padded[:, 0, 0, :5], valid[:, 0, 0, :5] * 4 / 9, rtol=1e-5)
    with pytest.raises(ValueError, match="border_pooling"):
        PatchCoreParams(border_pooling="reflect")


def _clusters_covered(**coreset_args) -> int:
    """Clusters a 25-row coreset of two 1,000-row chunks reaches: the first chunk is one
    tight cluster, the second holds 24 (ratio 0.0125, chunks of 1,000)."""
    from defectflow.tasks.coreset import StreamingCoreset

    rng = np.random.default_rng(5)
    centers = rng.normal(0, 50, size=(25, 16))
    first = centers[0] + rng.normal(0, 0.1, size=(1000, 16))
    second = centers[1 + np.arange(1000) % 24] + rng.normal(0, 0.1, size=(1000, 16))
    coreset = StreamingCoreset(0.0125, projection_dim=16, chunk_size=1000, **coreset_args)
    coreset.add(np.concatenate([first, second]).astype(np.float32))
    bank = coreset.finish()
    assert abs(len(bank) - 25) <= 1 and coreset.seen == 2000  # per-chunk rounding
    return len(set(np.linalg.norm(bank[:, None] - centers[None], axis=2).argmin(axis=1)))


def test_two_stage_coreset_covers_clusters_that_per_chunk_selection_misses():
    # Per chunk, 12-13 rows go to the single cluster of the first chunk.
    assert _clusters_covered(oversample=1) < 20
    # The final pass over both chunks' candidates spends them where the clusters are.
    assert _clusters_covered(oversample=4) == 25


def test_second_stage_pool_reduces_the_candidates_of_several_chunks_together():
    # Each chunk keeps 50 candidates. A pool of 50 reduces each chunk's alone: the single
    # cluster of the first chunk takes half the bank, as in per-chunk selection.
    assert _clusters_covered(oversample=4, pool=50) < 20
    # A pool of 100 reduces both chunks' candidates at once.
    assert _clusters_covered(oversample=4, pool=100) == 25


def test_torch_flat_index_finds_what_faiss_flat_index_finds():
    # PatchCore's exact search on a GPU; run on the CPU here, in blocks smaller than the
    # queries, against faiss's flat index on the same bank.
    import faiss

    from defectflow.tasks.methods.flat_search import TorchFlatIndex

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 24)).astype(np.float32)
    queries = rng.normal(size=(130, 24)).astype(np.float32)
    flat = faiss.IndexFlatL2(24)
    flat.add(bank)
    expected_d, expected_i = flat.search(queries, 5)
    index = TorchFlatIndex(bank, "cpu", block_bytes=4 * len(bank) * 32)
    assert index.rows_per_block == 32
    found_d, found_i = index.search(queries, 5)
    np.testing.assert_array_equal(found_i, expected_i)
    np.testing.assert_allclose(found_d, expected_d, rtol=1e-4, atol=1e-4)
    assert index.search(queries[:3], 900)[1].shape == (3, 500)   # k capped at the bank
    # One neighbour: a reduction instead of topk, the same answer; the CPU's default blocks.
    one_d, one_i = TorchFlatIndex(bank, "cpu").search(queries, 1)
    np.testing.assert_array_equal(one_i, expected_i[:, :1])
    np.testing.assert_allclose(one_d, expected_d[:, :1], rtol=1e-4, atol=1e-4)
    assert index.search(queries[:0], 2)[1].shape == (0, 2)
    # On the CPU the index searches the bank in place: no second copy of a large bank.
    assert np.shares_memory(index.bank.numpy(), bank)


def test_feature_chunks_read_consecutive_and_scattered_rows_alike():
    """Consecutive rows come as one slice of the store, others through a gather and a
    reorder: both give each patch its own row, as float32, in the set's order."""
    from defectflow.tasks.methods.base import PatchSet

    rng = np.random.default_rng(0)
    maps = {"a": rng.normal(size=(40, 3, 4, 4)).astype(np.float16),
            "b": rng.normal(size=(40, 5, 2, 2)).astype(np.float16)}

    class Store:
        def maps(self, layer):
            return maps[layer]

    for positions in (np.arange(7, 30), rng.permutation(40)[:23]):
        table = pd.DataFrame({"label": np.zeros(len(positions), int)})
        patches = PatchSet(table, Store(), positions, {}, 32, (0.0,) * 3, (1.0,) * 3)
        seen = 0
        for part, chunk in patches.feature_chunks(["a", "b"], chunk_size=10):
            for layer in ("a", "b"):
                assert chunk[layer].dtype == np.float32
                np.testing.assert_array_equal(chunk[layer],
                                              maps[layer][positions[part]].astype(np.float32))
            seen += part.stop - part.start
        assert seen == len(positions)


def test_the_extraction_model_is_built_once_per_process(monkeypatch):
    """A served model extracts on every request: the backbone is read and folded once, and
    another layer set or backbone is another model."""
    import defectflow.tasks.backbones as backbones

    features_mod.extraction_model.cache_clear()
    built = []
    real = backbones.load_backbone

    def counting(name, layers, device="cpu"):
        built.append((name, tuple(layers)))
        return real(name, layers, device=device)

    monkeypatch.setattr(backbones, "load_backbone", counting)
    first = features_mod.extraction_model("efficientnet_lite0", ("blocks.2",), "cpu")
    assert features_mod.extraction_model("efficientnet_lite0", ("blocks.2",), "cpu") is first
    other = features_mod.extraction_model("efficientnet_lite0", ("blocks.2", "blocks.4"), "cpu")
    assert other is not first
    assert built == [("efficientnet_lite0", ("blocks.2",)),
                     ("efficientnet_lite0", ("blocks.2", "blocks.4"))]
    features_mod.extraction_model.cache_clear()
