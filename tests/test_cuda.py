"""The CUDA path (``features.device: cuda``), run where torch sees a GPU, skipped elsewhere.

Each detector is fitted and scored twice on the same generated data, with the features
extracted on the CPU and on the GPU; the GPU run must give the CPU run's results (to
float32 rounding for the deterministic detectors, to the same ranking quality for the
trained ones), so a GPU user gets the detector the README's figures describe.
"""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from defectflow.tasks import features as features_mod
from defectflow.tasks.feature_settings import FeatureSettings
from defectflow.tasks.methods import CutPaste, FeatureEnsemble, MSFlow, PaDiM, PatchCore, PatchSet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")

LAYERS = ("blocks.2", "blocks.4")
SIZE = 64


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from conftest import prepared_product

    tmp = tmp_path_factory.mktemp("cuda")
    manifest, patches, paths, stats = prepared_product(tmp / "product", n_good=40, n_bad=10)

    def sets(device):
        store = features_mod.extract_features(
            patches, manifest, FeatureSettings(layers=LAYERS, input_size=SIZE, device=device),
            mean=stats["mean"], std=stats["std"], cache_dir=tmp / f"cache-{device}",
            progress=False)

        def subset(split):
            pos = np.flatnonzero((patches["split"] == split).to_numpy())
            return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, SIZE,
                            tuple(stats["mean"]), tuple(stats["std"]), device=device)

        return subset("train"), subset("test")

    return {"cpu": sets("cpu"), "cuda": sets("cuda")}


def test_features_extracted_on_the_gpu_equal_the_cpus(product):
    (cpu_train, _), (gpu_train, _) = product["cpu"], product["cuda"]
    for layer in LAYERS:
        cpu = cpu_train.store.maps(layer)[:].astype(np.float32)
        gpu = gpu_train.store.maps(layer)[:].astype(np.float32)
        # Both stores hold float16: a difference of a few float16 steps of the scale.
        assert np.abs(cpu - gpu).max() <= 5e-3 * np.abs(cpu).max(), layer


@pytest.mark.parametrize("make", [lambda: PatchCore(), lambda: PaDiM()], ids=["patchcore", "padim"])
def test_deterministic_detectors_score_on_the_gpu_as_on_the_cpu(product, make):
    cpu_train, cpu_test = product["cpu"]
    gpu_train, gpu_test = product["cuda"]
    cpu_scores, cpu_maps = make().fit(cpu_train).score(cpu_test)
    # Same stored features, fitted and scored on the GPU (coreset, search, Gaussians there).
    gpu_scores, gpu_maps = make().fit(dataclasses.replace(cpu_train, device="cuda")
                                      ).score(dataclasses.replace(cpu_test, device="cuda"))
    scale = np.abs(cpu_scores).max()
    assert np.abs(gpu_scores - cpu_scores).max() <= 1e-3 * scale
    assert np.abs(gpu_maps - cpu_maps).max() <= 1e-3 * np.abs(cpu_maps).max()
    # And from features extracted on the GPU, end to end.
    labels = cpu_test.labels
    all_gpu, _ = make().fit(gpu_train).score(gpu_test)
    assert roc_auc_score(labels, all_gpu) == pytest.approx(roc_auc_score(labels, cpu_scores),
                                                           abs=0.02)


def test_patchcore_searches_on_the_gpu_when_it_scores_there(product):
    train, test = product["cuda"]
    detector = PatchCore().fit(train)
    detector.score(test)
    assert type(detector.exact_index).__name__ == "TorchFlatIndex"
    assert detector.exact_index.bank.is_cuda


@pytest.mark.parametrize("make, network", [
    (lambda: MSFlow(MSFlow.Params(epochs=3)), "flow"),
    (lambda: FeatureEnsemble(FeatureEnsemble.Params(epochs=15, batch_size=128)), "discriminator"),
    (lambda: CutPaste(CutPaste.Params(epochs=2, batch_size=16, loc_fit_images=10)), "network"),
], ids=["msflow", "ensemble", "cutpaste"])
def test_trained_detectors_train_and_score_on_the_gpu(product, make, network):
    train, test = product["cuda"]
    detector = make().fit(train)
    assert next(getattr(detector, network).parameters()).is_cuda
    scores, maps = detector.score(test)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    assert roc_auc_score(test.labels, scores) > 0.6
