"""One-class SegAD fusion (appendix A.2) through the pipeline's steps: synthetic defects made
from held-out good images, scored by every detector exactly like real images, a fusion that
never sees a real defect and is evaluated on the whole test set; supervised mode unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import copies_as_synthetic, make_folder_dataset
from defectflow.tasks import fusion as segad
from defectflow.tasks import steps
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.feature_settings import FeatureSettings
from defectflow.tasks.fusion.deploy import FUSION_CONFIG_NAME, FusionConfig
from defectflow.tasks.methods import PaDiM, PatchCore
from defectflow.tasks.params import DatasetParams, FusionParams
from defectflow.tasks.steps.fuse import maps_of

METHODS = {PatchCore.name: PatchCore.Params(coreset_ratio=0.5, layers=("blocks.2", "blocks.4")),
           PaDiM.name: PaDiM.Params(layers=("blocks.2", "blocks.4"))}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A generated product scanned, featurized, and fitted + scored by two detectors."""
    tmp = tmp_path_factory.mktemp("one_class")
    data = make_folder_dataset(tmp / "product", n_good=40, n_bad=10)
    cache = str(tmp / "cache")
    dataset = DatasetParams(layout="folder", path=str(data), validation_fraction=0.3
                            ).model_dump(mode="json")
    features = FeatureSettings(input_size=64)
    scan = steps.scan_step(dataset, steps.source_fingerprint("folder", str(data)), cache)
    patches = steps.patches_step(scan.manifest, None, None, 31.0, cache)
    stats = steps.normalization_step(patches, scan.manifest, "product", "dataset")
    stats = {**stats, "denoise": None}
    store = steps.features_step(patches, scan.manifest, "product", features, stats, cache,
                                progress=False)
    models, scores = {}, {}
    for method, options in METHODS.items():
        models[method] = steps.train_step(store, patches, scan.manifest, "product", method,
                                          options, features, stats, cache)
        scores[method] = steps.score_step(models[method], store, patches, scan.manifest,
                                          "product", method, features, stats, cache)
    return dict(tmp=tmp, cache=cache, manifest=scan.manifest, patches=patches, stats=stats,
                store=store, models=models, scores=scores, features=features)


def test_changed_method_code_retrains_and_unchanged_code_reuses_the_model(scored):
    s = scored
    args = (s["store"], s["patches"], s["manifest"], "product", "padim",
            METHODS["padim"], s["features"], s["stats"], s["cache"])
    from defectflow.tasks.methods import source_hash

    assert steps.train_step(*args, method_source=source_hash("padim")) == s["models"]["padim"]
    retrained = steps.train_step(*args, method_source="edited padim")
    assert retrained.key != s["models"]["padim"].key
    assert (Path(retrained.path) / "train_defects.json").is_file()


def fusion_params(**changes) -> FusionParams:
    return FusionParams(segments=4, seeds=2, n_defective=4, **changes)


def test_one_class_fusion_trains_on_synthetic_defects_and_evaluates_every_test_image(scored):
    s = scored
    fusion = fusion_params(mode="one_class")
    ref = steps.fusion_step(s["scores"], s["manifest"], "product", fusion, s["cache"],
                            models=s["models"], features=s["features"], stats=s["stats"])
    folder = Path(ref.path)
    summary = json.loads((folder / "summary.json").read_text())
    manifest = s["manifest"].table()
    val = manifest[manifest["split"] == "val"]
    test = manifest[manifest["split"] == "test"]
    assert summary["mode"] == "one_class"
    assert summary["n_synthetic"] == 2 * len(val)  # one defect per held-out image and seed
    per_seed = pd.read_csv(folder / "per_seed.csv")
    assert per_seed["seed"].tolist() == [0, 1]
    # Trained on held-out goods and as many synthetic defects; no real defect anywhere.
    assert (per_seed["n_train_good"] == len(val)).all()
    assert (per_seed["n_train_bad"] == len(val)).all()
    fused = pd.read_csv(folder / "scores.csv")
    for seed in (0, 1):  # every seed evaluates the whole test set
        assert sorted(fused[fused["seed"] == seed]["image_id"]) == sorted(test["image_id"])
    # Blob defects are unlike the synthetic ones, yet the fusion ranks them well.
    assert summary["image_auroc_mean"] >= 0.85
    assert np.isfinite(summary["image_auroc_std"])

    synthetic = next((Path(s["cache"]) / "synthetic").iterdir())
    table = pd.read_parquet(synthetic / "manifest.parquet")
    assert set(table["source_image_id"]) == set(val["image_id"])
    assert table["image_id"].str.startswith("synthetic/").all()
    assert set(table["defect_type"]) <= {f"synthetic_{k}" for k in segad.DEFECT_KINDS}
    # A synthetic image differs from its source only inside its defect mask.
    from defectflow.tasks.images import read_image, read_mask

    row = table.iloc[0]
    source = read_image(manifest.set_index("image_id").loc[row["source_image_id"], "path"])
    changed = (read_image(row["path"]) != source).any(axis=2)
    assert changed.any() and not (changed & ~read_mask(row["mask_path"])).any()

    # Same inputs: the cached fusion is found, nothing is recomputed.
    stamp = (folder / "summary.json").stat().st_mtime_ns
    again = steps.fusion_step(s["scores"], s["manifest"], "product", fusion, s["cache"],
                              models=s["models"], features=s["features"], stats=s["stats"])
    assert again == ref and (folder / "summary.json").stat().st_mtime_ns == stamp


def test_synthetic_images_are_scored_exactly_like_real_images(scored, tmp_path):
    # Copies of real test images, handed to the synthetic path, get the very maps and scores
    # that the real score step gave them: same pixels in, same preprocessing, same detector.
    s = scored
    manifest = s["manifest"].table()
    fake = copies_as_synthetic(manifest[manifest["split"] == "test"].head(5), tmp_path)
    for method in METHODS:
        ref = steps.synthetic_scores_step(s["models"][method], method, fake, "product",
                                          s["features"], s["stats"], s["cache"])
        got = pd.read_parquet(Path(ref.path) / "scores.parquet")
        got_maps = np.load(Path(ref.path) / "anomaly_maps.npy")
        table = pd.read_parquet(Path(s["scores"][method].path) / "scores.parquet")
        ids = manifest[manifest["split"] == "test"].head(5)["image_id"].tolist()
        expected_maps = maps_of(s["scores"][method], table, ids)
        expected = table.set_index("image_id").loc[ids, "score"].to_numpy()
        np.testing.assert_allclose(got["score"].to_numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_maps.astype(np.float32),
                                   expected_maps.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_synthetic_defects_are_seeded_and_need_held_out_images(scored, tmp_path):
    s = scored
    manifest = s["manifest"].table()
    val_ids = sorted(manifest[manifest["split"] == "val"]["image_id"])[:3]
    segments = segad.grid_segments(64, 4)
    first = steps.synthetic_step(s["manifest"], val_ids, "product", segments, [0, 1], 2,
                                 str(tmp_path / "a"))
    second = steps.synthetic_step(s["manifest"], val_ids, "product", segments, [0, 1], 2,
                                  str(tmp_path / "b"))
    a = pd.read_parquet(Path(first.path) / "manifest.parquet")
    b = pd.read_parquet(Path(second.path) / "manifest.parquet")
    assert first.key == second.key and len(a) == 3 * 2 * 2
    assert a["content_hash"].tolist() == b["content_hash"].tolist()  # same seed, same pixels
    assert a["content_hash"].nunique() == len(a)  # every seed and copy draws its own defect
    other = steps.synthetic_step(s["manifest"], val_ids, "product", segments, [5], 1,
                                 str(tmp_path / "a"))
    assert other.key != first.key
    with pytest.raises(DefectflowError, match="held-out good"):
        steps.synthetic_step(s["manifest"], [], "product", segments, [0], 1, str(tmp_path))
    with pytest.raises(DefectflowError, match="model"):
        steps.fusion_step(s["scores"], s["manifest"], "product", fusion_params(mode="one_class"),
                          str(tmp_path / "c"))


def test_supervised_mode_results_are_the_protocol_as_before(scored):
    # The paper setting is exactly SegAD's protocol on the detectors' maps; the auto setting
    # runs the same splits and says per seed which fusion it chose and why.
    s = scored
    manifest = s["manifest"].table().set_index("image_id")
    tables = {m: pd.read_parquet(Path(r.path) / "scores.parquet") for m, r in s["scores"].items()}
    ids = sorted(set.intersection(*(set(t["image_id"]) for t in tables.values())))
    detectors = sorted(tables)
    maps = [maps_of(s["scores"][m], tables[m], ids) for m in detectors]
    paper_frame = segad.feature_frame(maps, segad.grid_segments(64, 4), ids, detectors)
    own = segad.score_frame([tables[m].set_index("image_id").loc[ids, "score"].to_numpy()
                             for m in detectors], ids, detectors)
    labels = manifest.loc[ids, "label"].astype(int)
    splits = segad.supervised_splits(ids, labels.tolist(), manifest.loc[ids, "split"].tolist(),
                                     n_defective=4, seeds=range(2))
    expected = segad.run_protocol(paper_frame.join(own), labels, splits, n_jobs=1,
                                  baselines=segad.score_columns(detectors),
                                  choice=segad.ChoiceSettings((), tuple(paper_frame.columns)))
    ref = steps.fusion_step(s["scores"], s["manifest"], "product",
                            fusion_params(setting="paper"), s["cache"])
    per_seed = pd.read_csv(Path(ref.path) / "per_seed.csv")
    pd.testing.assert_frame_equal(per_seed, expected.per_seed, check_dtype=False)
    assert (per_seed["choice"] == "forest").all()
    summary = json.loads((Path(ref.path) / "summary.json").read_text())
    assert summary["mode"] == "supervised" and "n_synthetic" not in summary
    assert summary["setting"] == "paper" and summary["choices"] == "forest x2"
    assert (per_seed["n_train_bad"] == 4).all()
    config = FusionConfig.load(Path(ref.path) / FUSION_CONFIG_NAME)
    assert config.model == "forest" and config.forest_columns == tuple(paper_frame.columns)

    auto = steps.fusion_step(s["scores"], s["manifest"], "product", fusion_params(), s["cache"])
    chosen = pd.read_csv(Path(auto.path) / "per_seed.csv")
    assert chosen["seed"].tolist() == [0, 1]
    assert set(chosen["choice"]) <= {"forest", "stacker", *detectors}
    assert chosen["choice_reason"].str.contains("CV AUROC on the training split").all()
    # The seeds' evaluation images are the paper setting's: the same splits.
    assert pd.read_csv(Path(auto.path) / "scores.csv")["image_id"].tolist() == \
        pd.read_csv(Path(ref.path) / "scores.csv")["image_id"].tolist()
    served = FusionConfig.load(Path(auto.path) / FUSION_CONFIG_NAME)
    assert served.model == chosen["choice"].iloc[0] and served.choice_reason


def test_plots_step_draws_every_method_and_embeds_images_from_the_feature_store(scored):
    s = scored
    evaluations = {m: steps.evaluate_step(r, s["manifest"], "product", 0.99, 0, s["cache"])
                   for m, r in s["scores"].items()}
    fused = steps.fusion_step(s["scores"], s["manifest"], "product", fusion_params(), s["cache"])
    ref = steps.plots_step(evaluations, s["manifest"], "product", s["store"], s["cache"],
                           fusion=fused, tsne_points=12, seed=3)
    files = sorted(p.name for p in Path(ref.path).iterdir())
    assert files == ["curves.png", "defect_types.png", "tsne.png"]
    assert all((Path(ref.path) / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files)
    assert steps.plots_step(evaluations, s["manifest"], "product", s["store"], s["cache"],
                            fusion=fused, tsne_points=12, seed=3) == ref  # cached
    # Embeddings: each layer's map averaged over positions, layers side by side; a seeded
    # sample of the test images when there are more than asked for.
    manifest = s["manifest"].table().set_index("image_id")
    embeddings, ids = steps.image_embeddings(s["store"], manifest, "product", 12, seed=3)
    again, same_ids = steps.image_embeddings(s["store"], manifest, "product", 12, seed=3)
    assert len(ids) == 12 and ids == same_ids and np.array_equal(embeddings, again)
    assert set(manifest.loc[ids, "split"]) == {"test"}
    patch_ids = pd.read_parquet(Path(s["store"].directory) / "patches.parquet")["image_id"]
    row = int(np.flatnonzero(patch_ids.to_numpy() == ids[0])[0])
    expected = np.concatenate([np.asarray(s["store"].maps(layer)[row], np.float32).mean(axis=(1, 2))
                               for layer in s["store"].layers])
    np.testing.assert_allclose(embeddings[0], expected, rtol=1e-5)
    assert steps.image_embeddings(s["store"], manifest, "product", 0)[1] == []
