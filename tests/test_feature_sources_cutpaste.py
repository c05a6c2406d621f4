"""The encoder CutPaste trained in the run as a member of the heterogeneous feature ensemble
(``features.sources: [..., {backbone: cutpaste, layers: [...]}]``): its maps are the trained
encoder's, a cached rerun reuses the encoder and every store, a changed CutPaste setting
re-extracts that member only, a registered model carries the encoder and scores new images
as the pipeline did (ImageScorer and the MLflow pyfunc), the flow trains CutPaste once
before the features, and bad settings end in one line naming the setting."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import copies_as_synthetic, make_folder_dataset
from defectflow.tasks import features as features_lib
from defectflow.tasks import steps
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.feature_settings import FeatureSettings
from defectflow.tasks.feature_sources import check_sources
from defectflow.tasks.feature_transform import TRANSFORM_NAME
from defectflow.tasks.features import preprocess
from defectflow.tasks.methods import CutPaste, PaDiM
from defectflow.tasks.methods.cutpaste import CutPasteParams
from defectflow.tasks.methods.cutpaste_encoder import ENCODER_FILE, encoder_params
from defectflow.tasks.params import DatasetParams, PipelineParams

# Tiny training: one step of 4 images and their augmented views; the GDEs on the 16-wide
# projection. The default finetune_stages (3) trains blocks.5, blocks.6 and head; the earlier
# stages keep their ImageNet weights, so the source reads blocks.5.
TINY = {"epochs": 1, "batch_size": 8, "images_per_epoch": 4, "head_layers": [16],
        "embedding": "projection", "loc_fit_images": 2, "validation_fraction": 0.0}
LITE0 = {"backbone": "efficientnet_lite0", "layers": ["blocks.1", "blocks.2"]}
ENCODER = {"backbone": CutPaste.name, "layers": ["blocks.5"]}
CATEGORY = "product"


def hetero(*sources, combine="global", channels=8) -> FeatureSettings:
    return FeatureSettings(input_size=64, sources=sources, combine=combine, channels=channels)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cutpaste-source")
    data = make_folder_dataset(tmp / CATEGORY, n_good=16, n_bad=4)
    cache = str(tmp / "cache")
    dataset = DatasetParams(layout="folder", path=str(data)).model_dump(mode="json")
    scan = steps.scan_step(dataset, steps.source_fingerprint("folder", str(data)), cache)
    patches = steps.patches_step(scan.manifest, None, None, 31.0, cache)
    stats = {**steps.normalization_step(patches, scan.manifest, CATEGORY, "dataset"),
             "denoise": None}
    return dict(tmp=tmp, data=data, cache=cache, manifest=scan.manifest, patches=patches,
                stats=stats)


def encoder_and_store(p, features, cutpaste):
    """What the flow does: CutPaste trained on pixels first, then the features step."""
    encoder = steps.train_step(None, p["patches"], p["manifest"], CATEGORY, CutPaste.name,
                               cutpaste, features, p["stats"], p["cache"])
    store = steps.features_step(p["patches"], p["manifest"], CATEGORY, features, p["stats"],
                                p["cache"], progress=False, encoder=encoder)
    return encoder, store


def spy_on(patcher) -> dict:
    """Record the networks whose maps are extracted and the number of CutPaste fits."""
    seen = {"extracted": [], "fits": 0}
    write, fit = features_lib._write_feature_maps, CutPaste.fit

    def spy_write(folder, model, *args, **kwargs):
        seen["extracted"].append(model.name)
        return write(folder, model, *args, **kwargs)

    def spy_fit(self, train):
        seen["fits"] += 1
        return fit(self, train)

    patcher.setattr(features_lib, "_write_feature_maps", spy_write)
    patcher.setattr(CutPaste, "fit", spy_fit)
    return seen


@pytest.fixture
def spies(monkeypatch):
    return spy_on(monkeypatch)


@pytest.fixture(scope="module")
def trained(prepared):
    """The encoder trained and the features extracted once, as the flow does, in the module's
    fresh cache (the first use of these settings there), with the work it took."""
    with pytest.MonkeyPatch.context() as patcher:
        seen = spy_on(patcher)
        encoder, store = encoder_and_store(prepared, hetero(LITE0, ENCODER),
                                           CutPasteParams(**TINY))
    return dict(encoder=encoder, store=store, **seen)


def test_maps_are_the_trained_encoders_and_a_rerun_reuses_them(prepared, trained, spies):
    p, features, cutpaste = prepared, hetero(LITE0, ENCODER), CutPasteParams(**TINY)
    encoder, store = trained["encoder"], trained["store"]
    assert trained["fits"] == 1 and sorted(trained["extracted"]) == [
        f"{CutPaste.name}:efficientnet_lite0", "efficientnet_lite0"]
    meta = json.loads((Path(store.directory) / "meta.json").read_text())
    member = features_lib.open_store(p["cache"], meta["sources"][1])
    # The member's maps are the trained encoder's blocks.5 (up to float16 and folded batch
    # norms), not ImageNet Lite0's.
    rows = steps.common.category_rows(p["patches"], CATEGORY)
    image = steps.common.image_paths(p["manifest"])[rows["image_id"].iloc[0]]
    from defectflow.tasks.images import read_image

    net = CutPaste.load(encoder.path).network.encoder.eval()
    x = torch.from_numpy(preprocess(read_image(image), 64, p["stats"]["mean"],
                                    p["stats"]["std"]))[None]
    with torch.no_grad():
        for name, stage in zip(net.stage_names, net.stages):
            x = stage(x)
            if name == "blocks.5":
                break
    stored = np.asarray(member.maps("blocks.5")[0], np.float32)
    np.testing.assert_allclose(stored, x[0].numpy(), atol=2e-2 * float(x.abs().max()))
    imagenet = steps.features_step(p["patches"], p["manifest"], CATEGORY,
                                   FeatureSettings(input_size=64, layers=("blocks.5",)),
                                   p["stats"], p["cache"], progress=False)
    assert np.abs(np.asarray(imagenet.maps("blocks.5")[0], np.float32) - stored).max() > 0.1
    # The combined store keeps the encoder for the models trained on it.
    assert (Path(store.directory) / ENCODER_FILE).is_file()

    # A rerun: the encoder and every store are found, nothing trains or extracts.
    spies["extracted"].clear()   # the ImageNet store above
    again_encoder, again = encoder_and_store(p, features, cutpaste)
    assert (again_encoder, again) == (encoder, store)
    assert spies["fits"] == 0 and spies["extracted"] == []

    # Another CutPaste setting: CutPaste retrains and only its member is extracted again.
    other_encoder, other = encoder_and_store(p, features, dataclasses.replace(cutpaste, seed=1))
    assert spies["fits"] == 1 and spies["extracted"] == [f"{CutPaste.name}:efficientnet_lite0"]
    other_meta = json.loads((Path(other.directory) / "meta.json").read_text())
    assert other_meta["sources"][0] == meta["sources"][0]
    assert other_meta["sources"][1] != meta["sources"][1] and other.key != store.key
    assert other_encoder.key != encoder.key


def test_a_registered_model_carries_the_encoder_and_scores_as_the_pipeline(prepared, trained,
                                                                          tmp_path, spies):
    import mlflow

    from defectflow.tasks.serving import ScoringConfig, write_model_folder
    from defectflow.tasks.serving.scorer import ImageScorer
    from defectflow.tasks.tracking.pyfunc import DetectorPyfunc

    p = prepared
    params = PipelineParams(features=dataclasses.asdict(hetero(LITE0, ENCODER)),
                            methods={PaDiM.name: {}, CutPaste.name: TINY})
    features = params.features
    cutpaste = encoder_params(features, params.methods)
    assert cutpaste is params.methods[CutPaste.name]   # the method's own settings
    _, store = encoder_and_store(p, features, cutpaste)
    assert store == trained["store"] and spies["fits"] == 0    # the same keys: found
    model = steps.train_step(store, p["patches"], p["manifest"], CATEGORY, PaDiM.name,
                             params.methods[PaDiM.name], features, p["stats"], p["cache"])
    assert {TRANSFORM_NAME, ENCODER_FILE} <= {f.name for f in Path(model.path).iterdir()}
    scored = steps.score_step(model, store, p["patches"], p["manifest"], CATEGORY, PaDiM.name,
                              features, p["stats"], p["cache"])
    table = pd.read_parquet(Path(scored.path) / "scores.parquet")
    config = ScoringConfig(method=PaDiM.name, dataset="d", category=CATEGORY, features=features,
                           mean=tuple(p["stats"]["mean"]), std=tuple(p["stats"]["std"]),
                           threshold=0.0)
    folder = write_model_folder(tmp_path / "registered", model.path, config)
    # The MLflow pyfunc as the registry logs it, saved and loaded back by MLflow, scores the
    # validation and test images as the pipeline did (ImageScorer does the work inside).
    spies["extracted"].clear()
    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(saved), python_model=DetectorPyfunc(),
                             artifacts={"model": str(folder)})
    paths = p["manifest"].table().set_index("image_id").loc[table["image_id"], "path"].tolist()
    predicted = mlflow.pyfunc.load_model(str(saved)).predict(pd.DataFrame({"path": paths}))
    np.testing.assert_allclose(predicted["score"].to_numpy(), table["score"].to_numpy(),
                               rtol=1e-4, atol=1e-5)
    # Its features came from the encoder the model carries (and ImageNet Lite0).
    assert sorted(spies["extracted"]) == [f"{CutPaste.name}:efficientnet_lite0",
                                          "efficientnet_lite0"]
    assert (predicted["score"].to_numpy()[table["label"].to_numpy() == 1].mean()
            > predicted["score"].to_numpy()[table["label"].to_numpy() == 0].mean())
    # Without its encoder the model cannot make its features: one line says why.
    (folder / "detector" / ENCODER_FILE).unlink()
    with pytest.raises(DefectflowError, match=re.escape(
            f"features.sources[1] reads the encoder {CutPaste.name} trained")) as caught:
        ImageScorer.from_folder(folder).score(paths[:1])
    assert "\n" not in str(caught.value)


def test_the_cutpaste_model_scores_synthetic_images_as_real_ones(prepared, trained, tmp_path):
    """One-class fusion scores synthetic images with every detector: CutPaste, trained before
    the features (no transform in its folder), reads pixels only and needs no feature store."""
    p, features = prepared, hetero(LITE0, ENCODER)
    encoder, store = trained["encoder"], trained["store"]
    scored = steps.score_step(encoder, store, p["patches"], p["manifest"], CATEGORY,
                              CutPaste.name, features, p["stats"], p["cache"])
    table = pd.read_parquet(Path(scored.path) / "scores.parquet").head(3)
    rows = p["manifest"].table().set_index("image_id").loc[table["image_id"]].reset_index()
    ref = steps.synthetic_scores_step(encoder, CutPaste.name, copies_as_synthetic(rows, tmp_path),
                                      CATEGORY, features, p["stats"], p["cache"])
    got = pd.read_parquet(Path(ref.path) / "scores.parquet")["score"].to_numpy()
    np.testing.assert_allclose(got, table["score"].to_numpy(), rtol=1e-5, atol=1e-5)


def test_the_flow_trains_cutpaste_once_before_the_features(prepared, tmp_path, spies):
    from mlflow.tracking import MlflowClient

    from defectflow.cli import main

    params = {
        "dataset": {"layout": "folder", "path": str(prepared["data"]), "name": "generated"},
        "features": {"input_size": 64, "sources": [LITE0, ENCODER], "channels": 8},
        "methods": {PaDiM.name: {}, CutPaste.name: TINY},
        "evaluation": {"overlays": 0, "plots": False},
        "fusion": {"enabled": False},
        "categorization": {"n_clusters": 2, "max_side": 32},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "encoder"},
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["run", str(path), "--quiet"]) == 0
    # CutPaste is a method and the encoder of a source: one fit serves both.
    assert spies["fits"] == 1
    client = MlflowClient(tracking_uri=params["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name("encoder").experiment_id])
    children = {r.data.tags["method"]: r.data.metrics for r in runs
                if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {PaDiM.name, CutPaste.name}
    assert children[PaDiM.name]["image_auroc"] >= 0.8


@pytest.mark.parametrize("features, cutpaste, setting", [
    (hetero(LITE0, {"backbone": CutPaste.name, "layers": ["layer2"]}), {},
     f"features.sources[1].layers: unknown layer(s) ['layer2'] for the {CutPaste.name} "
     "encoder 'efficientnet_lite0'"),
    (hetero(LITE0, ENCODER), {"encoder": "resnet18"},
     f"features.sources[1].layers: unknown layer(s) ['blocks.5'] for the {CutPaste.name} "
     "encoder 'resnet18'"),
    # Lite0's blocks.0 gives 16 channels.
    (hetero(LITE0, {"backbone": CutPaste.name, "layers": ["blocks.0"]}, combine="individual",
            channels=17), {},
     "features.channels: 17 is more than the 16 channels of features.sources[1]"),
])
def test_bad_encoder_sources_end_in_one_line_naming_the_setting(features, cutpaste, setting):
    with pytest.raises(DefectflowError, match=re.escape(setting)) as caught:
        check_sources(features, "params/x.yaml", cutpaste=CutPasteParams(**cutpaste))
    assert "\n" not in str(caught.value) and str(caught.value).startswith("params/x.yaml: ")


def test_encoder_settings_are_the_methods_or_cutpastes_defaults():
    features = hetero(LITE0, ENCODER)
    assert encoder_params(hetero(LITE0), {}) is None
    assert encoder_params(features, {}) == CutPasteParams()
    own = CutPasteParams(epochs=2)
    assert encoder_params(features, {CutPaste.name: own}) is own


def test_the_encoder_as_a_single_backbone_points_at_features_sources():
    from defectflow.flows.preflight import preflight

    params = PipelineParams(features={"backbone": CutPaste.name, "layers": ["blocks.5"]})
    with pytest.raises(DefectflowError, match=re.escape(
            f"features.backbone: unknown backbone '{CutPaste.name}'")) as caught:
        preflight(params)
    assert "list it under features.sources" in str(caught.value)
    assert "\n" not in str(caught.value)
