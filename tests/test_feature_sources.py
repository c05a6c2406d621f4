"""The heterogeneous feature ensemble (thesis 004, 2.1) as a feature source: each network's
store cached on its own, the global and individual transformation blocks, detectors fitted
and scored on the combined store, a registered model scoring new images with it, and bad
settings ending in one line naming the setting."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import add_defect, make_folder_dataset, textured_image
from defectflow.tasks import features as features_lib
from defectflow.tasks import steps
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.feature_settings import COMBINED_LAYER, FeatureSettings
from defectflow.tasks.feature_sources import check_sources, feature_store
from defectflow.tasks.feature_transform import TRANSFORM_NAME, FeatureTransform
from defectflow.tasks.methods import FeatureEnsemble, PaDiM, PatchCore
from defectflow.tasks.params import DatasetParams, PipelineParams

LITE0 = {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2"]}
LITE1 = {"backbone": "efficientnet_lite1", "layers": ["blocks.2"], "input_size": 96}
# Channels: Lite0 blocks.1 24 + blocks.2 40; Lite1 blocks.2 40.


def hetero(*sources, combine="global", channels=None) -> FeatureSettings:
    return FeatureSettings(input_size=64, sources=sources, combine=combine, channels=channels)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A generated product scanned and planned through the pipeline's own steps."""
    tmp = tmp_path_factory.mktemp("hetero")
    data = make_folder_dataset(tmp / "product", n_good=24, n_bad=6)
    cache = str(tmp / "cache")
    dataset = DatasetParams(layout="folder", path=str(data)).model_dump(mode="json")
    scan = steps.scan_step(dataset, steps.source_fingerprint("folder", str(data)), cache)
    patches = steps.patches_step(scan.manifest, None, None, 31.0, cache)
    stats = {**steps.normalization_step(patches, scan.manifest, "product", "dataset"),
             "denoise": None}
    return dict(tmp=tmp, cache=cache, manifest=scan.manifest, patches=patches, stats=stats)


def _store(p, features):
    return steps.features_step(p["patches"], p["manifest"], "product", features, p["stats"],
                               p["cache"], progress=False)


def test_adding_a_network_reuses_the_others_cached_features(prepared, monkeypatch):
    first = _store(prepared, hetero(LITE0, channels=8))
    extracted = []
    real = features_lib._write_feature_maps

    def spy(folder, model, *args, **kwargs):
        extracted.append(model.name)
        return real(folder, model, *args, **kwargs)

    monkeypatch.setattr(features_lib, "_write_feature_maps", spy)
    both = _store(prepared, hetero(LITE0, LITE1, channels=8))
    assert extracted == ["efficientnet_lite1"]          # Lite0's store was found, not redone
    assert both.key != first.key and both.layers == (COMBINED_LAYER,)
    # Single-backbone settings keep their old key: the plain store is Lite0's own member store.
    plain = FeatureSettings(input_size=64, layers=("blocks.1", "blocks.2"))
    assert _store(prepared, plain).key in json.loads(
        (Path(both.directory) / "meta.json").read_text())["sources"]
    assert extracted == ["efficientnet_lite1"]


@pytest.mark.parametrize("combine, channels, expected", [
    ("global", 16, 16), ("individual", 16, 32), ("global", None, 104), ("individual", None, 104)])
def test_transformation_blocks_give_their_channels_deterministically(prepared, combine,
                                                                     channels, expected):
    features = hetero(LITE0, LITE1, combine=combine, channels=channels)
    store = _store(prepared, features)
    maps = np.asarray(store.maps(COMBINED_LAYER), dtype=np.float32)
    rows = steps.common.category_rows(prepared["patches"], "product")
    # One grid: Lite0's blocks.1 at 64 px (stride 4); Lite1 at 96 px is resized onto it.
    assert maps.shape == (len(rows), expected, 16, 16)
    assert np.isfinite(maps).all()
    transform = FeatureTransform.load(Path(store.directory) / TRANSFORM_NAME)
    assert transform.source_channels == (64, 40) and transform.channels == expected
    if channels is not None:
        # PCA fitted on the training rows: there, components are uncorrelated and centred,
        # their variances falling (per block).
        train = maps[(rows["split"] == "train").to_numpy()]
        flat = train.transpose(0, 2, 3, 1).reshape(-1, expected)[:, :channels]
        assert np.abs(flat.mean(axis=0)).max() < 0.05 * flat.std(axis=0).max()
        variances = flat.var(axis=0)
        assert (np.diff(variances) <= 1e-3 * variances[0]).all()
    # Deterministic: a fresh cache gives the same numbers.
    again = steps.features_step(prepared["patches"], prepared["manifest"], "product", features,
                                prepared["stats"], str(prepared["tmp"] / f"again-{combine}"),
                                progress=False)
    assert again.key == store.key
    np.testing.assert_array_equal(np.asarray(again.maps(COMBINED_LAYER)), maps.astype(np.float16))


def test_detectors_fit_and_score_on_the_combined_source_and_a_registered_model_scores(
        prepared, tmp_path):
    from defectflow.tasks.serving import ScoringConfig, write_model_folder
    from defectflow.tasks.serving.scorer import ImageScorer

    p = prepared
    params = PipelineParams(features=dataclasses.asdict(hetero(LITE0, LITE1, channels=12)),
                            methods={PatchCore.name: {"coreset_ratio": 0.5}, PaDiM.name: {},
                                     FeatureEnsemble.name: {"epochs": 15, "batch_size": 128}})
    features = params.features
    assert {m.layers for m in params.methods.values()} == {(COMBINED_LAYER,)}
    store = _store(p, features)
    models, tables = {}, {}
    for method, method_params in params.methods.items():
        models[method] = steps.train_step(store, p["patches"], p["manifest"], "product", method,
                                          method_params, features, p["stats"], p["cache"])
        # The transform travels with the model.
        assert (Path(models[method].path) / TRANSFORM_NAME).is_file()
        scored = steps.score_step(models[method], store, p["patches"], p["manifest"],
                                  "product", method, features, p["stats"], p["cache"])
        table = tables[method] = pd.read_parquet(Path(scored.path) / "scores.parquet")
        good = table.loc[table["label"] == 0, "score"]
        bad = table.loc[table["label"] == 1, "score"]
        assert bad.mean() > good.mean(), method   # the dark blobs stand out on combined maps
    # The PaDiM model as the registry lays it out, scoring images it never saw.
    config = ScoringConfig(method=PaDiM.name, dataset="d", category="product", features=features,
                           mean=tuple(p["stats"]["mean"]), std=tuple(p["stats"]["std"]),
                           threshold=0.0)
    folder = write_model_folder(tmp_path / "registered", models[PaDiM.name].path, config)
    assert ScoringConfig.load(folder / "scoring.json").features == features
    rng = np.random.default_rng(7)
    good_image = textured_image(rng)
    bad_image = add_defect(textured_image(rng), rng)[0]
    result = ImageScorer.from_folder(folder).score([good_image, bad_image])
    assert result["score"].iloc[1] > result["score"].iloc[0]
    assert result["anomaly_map"].iloc[0].shape == (64, 64)
    # A test image through the registered model scores as it did in the pipeline: the same
    # members, the same fitted transform, the same combined features.
    test = tables[PaDiM.name].iloc[-1]
    path = p["manifest"].table().set_index("image_id").loc[test["image_id"], "path"]
    again = ImageScorer.from_folder(folder).score(path)["score"].iloc[0]
    assert again == pytest.approx(float(test["score"]), rel=1e-3)
    from defectflow.tasks.serving.onnx_export import load_model_folder

    with pytest.raises(DefectflowError, match="combined features .* cannot be exported"):
        load_model_folder(folder)
    # Without its transform a combined-feature model cannot score: one line says why.
    (folder / "detector" / TRANSFORM_NAME).unlink()
    with pytest.raises(DefectflowError, match="no feature transform"):
        ImageScorer.from_folder(folder).score([good_image])


def test_old_scoring_settings_still_load(tmp_path):
    from defectflow.tasks.serving import ScoringConfig

    old = {"method": PaDiM.name, "dataset": "d", "category": "c",
           "features": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"],
                        "input_size": 224, "batch_size": 8, "device": "auto"},
           "mean": [0.5] * 3, "std": [0.2] * 3, "threshold": 1.0, "version": 2}
    (tmp_path / "scoring.json").write_text(json.dumps(old))
    config = ScoringConfig.load(tmp_path / "scoring.json")
    assert config.features == FeatureSettings() and not config.features.combined
    assert config.version == 3
    # The registry's model key reads a single backbone's settings as version 2 wrote them:
    # a model registered before the ensemble is found again, not registered twice.
    keyed = json.loads(config.key_text())
    assert keyed["version"] == 2 and keyed["features"] == old["features"]
    combined = dataclasses.replace(config, features=hetero(LITE0, channels=8))
    assert json.loads(combined.key_text())["features"]["channels"] == 8


@pytest.mark.parametrize("features, setting", [
    (hetero({"backbone": "efficientnet_lite9", "layers": ["blocks.2"]}),
     "features.sources[0].backbone: unknown backbone 'efficientnet_lite9'"),
    (hetero(LITE0, {"backbone": "efficientnet_lite1", "layers": ["layer2"]}),
     "features.sources[1].layers: unknown layer"),
    (hetero(LITE0, LITE1, channels=105), "features.channels: 105 is more than the 104"),
    (hetero(LITE0, LITE1, combine="individual", channels=41),
     "features.channels: 41 is more than the 40 channels of features.sources[1]"),
])
def test_bad_sources_end_in_one_line_naming_the_setting(features, setting):
    with pytest.raises(DefectflowError, match=re.escape(setting)) as caught:
        check_sources(features, "params/x.yaml")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("params/x.yaml: ")


def test_missing_torchvision_weights_name_the_source_and_download_nothing(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DefectflowError, match=r"features.sources\[1\].backbone: .*not in the "
                                              "local torch hub cache"):
        check_sources(hetero(LITE0, {"backbone": "resnet18", "layers": ["layer2"]}))
    assert not (tmp_path / "hub").exists()


def test_bad_combine_or_channels_are_params_errors():
    with pytest.raises(ValueError, match="combine must be one of"):
        FeatureSettings(sources=(LITE0,), combine="average")
    with pytest.raises(ValueError, match="channels must be >= 1"):
        FeatureSettings(sources=(LITE0,), channels=0)
    with pytest.raises(ValueError, match="at least one layer"):
        FeatureSettings(sources=({"backbone": "efficientnet_lite0", "layers": []},))


def test_feature_store_needs_training_rows_or_a_transform(prepared):
    p = prepared
    rows = steps.common.category_rows(p["patches"], "product")
    with pytest.raises(ValueError, match="training rows or a transform"):
        feature_store(rows, p["manifest"].table(), hetero(LITE0), mean=p["stats"]["mean"],
                      std=p["stats"]["std"], cache_dir=p["cache"], progress=False)
