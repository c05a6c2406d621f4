"""The MSFlow detector (normalizing flow on cached features) on tiny generated images:
the flow's algebra, fitting, separation of generated defects, maps at the defect, seeding,
persistence, and a run of the whole flow with it as a child run."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.images import read_mask
from defectflow.tasks.methods.flow_blocks import (MAX_NLL, CouplingBlock, MultiScaleFlow,
                                                  positional_encoding, soft_clamp)
from defectflow.tasks.methods.msflow import MSFlow, MSFlowParams, standardization
from defectflow.tasks.params import load_params

LAYERS = ("blocks.2", "blocks.4")
SIZE = 64
# Small and short: the generated set has 24 training images of 8x8 + 4x4 positions; one
# parallel flow per layer and the fusion (``stack`` has its own test).
FAST = dict(layers=LAYERS, blocks=2, epochs=12, batch_size=4, learning_rate=2e-3, stack=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from conftest import product_feature_sets

    return product_feature_sets(tmp_path_factory.mktemp("msflow"), LAYERS, SIZE)


@pytest.fixture(scope="module")
def fitted(product):
    _, train, _ = product
    return MSFlow(MSFlowParams(**FAST)).fit(train)


def defect_masks(manifest, test):
    """{position in test: boolean mask at the input size} of the defective test images."""
    mask_paths = manifest.set_index("image_id")["mask_path"]
    masks = {}
    for pos, image_id in enumerate(test.table["image_id"]):
        if isinstance(mask_paths[image_id], str):
            masks[pos] = cv2.resize(read_mask(mask_paths[image_id]).astype(np.uint8),
                                    (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0
    return masks


# -- the flow's algebra ----------------------------------------------------------------
def test_coupling_log_determinant_equals_autograd_jacobian():
    """The summed log-scales are log|det J| of the whole block (rotation included)."""
    torch.manual_seed(0)
    block = CouplingBlock(4, 6, 3, 1.9, 0, torch.Generator().manual_seed(0)).double()
    for param in block.net.parameters():        # leave the identity start
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda v: block(v, None)[0], x)
    jacobian = jacobian.reshape(x.numel(), x.numel())
    with torch.no_grad():
        _, logdet = block(x, None)
    assert logdet.shape == (1, 3, 3)
    # The rotation was drawn in float32: its |det| is 1 to float32 precision.
    assert float(logdet.sum()) == pytest.approx(float(torch.linalg.slogdet(jacobian)[1]),
                                                abs=1e-5)


def test_soft_clamp_is_bounded_odd_and_linear_at_zero():
    s = torch.tensor([-1e6, -0.01, 0.0, 0.01, 1e6], dtype=torch.float64)
    out = soft_clamp(s, 1.9)
    assert out.abs().max() < 1.9 and out[0] == pytest.approx(-1.9, rel=1e-5) and out[2] == 0
    assert out[3] == -out[1] == pytest.approx(0.01 * 2 / math.pi, rel=1e-4)  # CS-Flow's 0.636


def test_untrained_flow_gives_the_standard_normal_nll_of_standardized_features():
    """Every block starts as a rotation (zero-initialized subnets): z is the standardized
    input rotated, so the NLL per dimension is 0.5 |x|^2 / C, log-det 0."""
    flow = MultiScaleFlow([6, 4], [(4, 4), (2, 2)], [2, 2], 1.0, 3, 1.9, True, 4, seed=0)
    flow.set_standardization([np.full(6, 2.0, np.float32), np.zeros(4, np.float32)],
                             [np.full(6, 1 / 0.5, np.float32), np.ones(4, np.float32)])
    x = [torch.randn(3, 6, 4, 4), torch.randn(3, 4, 2, 2)]
    nll = flow(x)
    standardized = (x[0] - 2.0) / 0.5
    torch.testing.assert_close(nll[0], 0.5 * (standardized ** 2).sum(1) / 6)
    torch.testing.assert_close(nll[1], 0.5 * (x[1] ** 2).sum(1) / 4)


def test_untrained_whitened_flow_scores_the_mahalanobis_distance_of_each_position():
    """``standardize: whiten`` makes each position's Gaussian (mean, covariance shrunk toward
    the pooled one as PaDiM's, + eps) the start: the untrained flow's NLL per dimension is the
    squared Mahalanobis distance / 2C, with numpy's covariance as the reference."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(5, 5))
    train = torch.from_numpy(np.einsum("nphw,cp->nchw", rng.normal(size=(12, 5, 3, 2)),
                                       mixing).astype(np.float32))
    test = torch.from_numpy(rng.normal(size=(4, 5, 3, 2)).astype(np.float32) * 2)
    mean, scale = standardization(train, "whiten", eps=0.01)
    flow = MultiScaleFlow([5], [(3, 2)], [2], 1.0, 3, 1.9, False, 0, seed=0,
                          standardize="whiten")
    flow.set_standardization([mean], [scale])
    with torch.no_grad():
        nll = flow([test])[0].flatten(1).numpy()                  # (4, 6)

    floor = 0.01 * float(train.double().var((0, 2, 3), unbiased=False).mean())
    vectors = train.double().flatten(2).numpy()                   # (n, C, P)
    covs = np.stack([np.cov(vectors[:, :, p], rowvar=False) for p in range(6)])
    weight = 5 / (5 + 12 - 1)                                     # d / (d + n - 1)
    for p in range(6):
        cov = (1 - weight) * covs[p] + weight * covs.mean(0) + floor * np.eye(5)
        diff = test.double().flatten(2).numpy()[:, :, p] - vectors[:, :, p].mean(0)
        distance = np.einsum("nc,cd,nd->n", diff, np.linalg.inv(cov), diff)
        np.testing.assert_allclose(nll[:, p], distance / (2 * 5), rtol=1e-4)


def test_maps_saturate_where_float16_storage_would_overflow(product, fitted):
    _, _, test = product
    _, chunk = next(test.feature_chunks(LAYERS))
    wild = [torch.from_numpy(chunk[layer]) * 1e4 for layer in LAYERS]
    with torch.no_grad():
        scores, maps = fitted.torch_head(SIZE)(wild)
    assert torch.isfinite(maps.half()).all() and float(maps.max()) <= MAX_NLL * 1.0001
    assert float(scores.min()) > 100      # saturated, still far above any good image


def test_positional_encoding_tells_every_position_apart():
    enc = positional_encoding(8, 5, 7)
    assert enc.shape == (8, 5, 7) and enc.abs().max() <= 1
    vectors = enc.flatten(1).T
    assert len(torch.unique(vectors.round(decimals=4), dim=0)) == 35


def test_params_reject_bad_values_and_are_selectable_in_params():
    for bad in (dict(blocks=0), dict(kernel=2), dict(pool=4), dict(positional=6),
                dict(top_k=1.5), dict(learning_rate=0), dict(layers=("a", "a")),
                dict(standardize="pca"), dict(eps=0)):
        with pytest.raises(ValueError):
            MSFlowParams(**bad)
    params = load_params(None, {"methods": {MSFlow.name: {"epochs": 3, "positional": 8}},
                                "features.layers": ["blocks.1", "blocks.3"]})
    typed = params.methods[MSFlow.name]
    assert isinstance(typed, MSFlowParams) and typed.epochs == 3
    assert typed.layers == ("blocks.1", "blocks.3")   # the layers come from ``features``


# -- fitting and scoring on generated images --------------------------------------------
def test_fit_logs_a_falling_loss_by_epoch(fitted):
    curve = fitted.history["train_loss"]
    assert len(curve) == FAST["epochs"] and all(math.isfinite(v) for v in curve)
    assert curve[-1] < 0.75 * curve[0] and curve[-1] < min(curve[:3])
    assert fitted.shapes_ == [(40, 8, 8), (112, 4, 4)]      # Lite0 blocks.2, blocks.4 at 64 px


def test_separates_generated_defects_and_its_map_peaks_at_the_defect(product, fitted):
    manifest, _, test = product
    scores, maps = fitted.score(test)
    assert scores.dtype == np.float32 and maps.shape == (len(test), SIZE, SIZE)
    assert image_metrics(test.labels, scores, float(np.median(scores)))["image_auroc"] >= 0.9
    masks = defect_masks(manifest, test)
    assert len(masks) >= 4
    positions = sorted(masks)
    assert pixel_metrics([masks[p] for p in positions],
                         [maps[p] for p in positions])["pixel_auroc"] >= 0.85
    # The hottest pixel of a defective image lies on (or right next to) its defect.
    near = 0
    for pos in positions:
        grown = cv2.dilate(masks[pos].astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        near += bool(grown.flat[maps[pos].argmax()])
    assert near >= 0.75 * len(positions)


def test_image_score_is_the_top_k_mean_of_the_map_and_the_head_is_the_scoring(product, fitted):
    _, _, test = product
    scores, maps = fitted.score(test)
    k = max(1, round(0.01 * SIZE * SIZE))
    top = np.sort(maps.reshape(len(maps), -1), axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(scores, top, rtol=1e-5)
    # The exported graph's head (``torch_head``) gives the same figures.
    _, chunk = next(test.feature_chunks(LAYERS))
    with torch.no_grad():
        head_scores, head_maps = fitted.torch_head(SIZE)([torch.from_numpy(chunk[layer])
                                                          for layer in LAYERS])
    np.testing.assert_allclose(head_scores.numpy(), scores[:len(head_scores)], rtol=1e-5)
    np.testing.assert_allclose(head_maps.numpy(), maps[:len(head_maps)], rtol=1e-5, atol=1e-6)


def test_save_and_load_score_the_same(product, fitted, tmp_path):
    _, _, test = product
    folder = fitted.save(tmp_path / "msflow")
    assert {"detector.json", "history.json", "flow.pt", "shapes.json"} <= {
        p.name for p in folder.iterdir()}
    restored = MSFlow.load(folder)
    assert restored.history == fitted.history and restored.params == fitted.params
    scores, maps = fitted.score(test)
    restored_scores, restored_maps = restored.score(test)
    np.testing.assert_array_equal(restored_scores, scores)
    np.testing.assert_array_equal(restored_maps, maps)


def test_training_is_deterministic_for_a_seed(product):
    _, train, test = product
    params = dict(FAST, epochs=2, positional=4)

    def fit(**extra):
        return MSFlow(MSFlowParams(**params, **extra)).fit(train)

    first, again, other = fit(), fit(), fit(seed=1)
    assert again.history == first.history and other.history != first.history
    np.testing.assert_array_equal(again.score(test)[0], first.score(test)[0])


# -- through the whole flow --------------------------------------------------------------
def test_runs_through_the_flow_as_a_child_run_with_its_training_curve(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from conftest import make_folder_dataset
    from defectflow.cli import main
    from test_flow import write_params

    data = make_folder_dataset(tmp_path / "product", n_good=30, n_bad=8)
    options = {k: v for k, v in FAST.items() if k != "layers"}
    params = write_params(tmp_path, data, methods={MSFlow.name: options},
                          fusion={"enabled": False})
    assert main(["run", str(params), "--quiet"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("product ")
               and MSFlow.name in line)
    assert float(row.split()[2]) >= 0.9                     # image AUROC in the table

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("generated")
    child = next(r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("mlflow.parentRunId"))
    assert child.data.tags["method"] == MSFlow.name
    assert child.data.params["method.epochs"] == str(FAST["epochs"])
    assert child.data.metrics["image_auroc"] >= 0.9 and "pixel_auroc" in child.data.metrics
    curve = client.get_metric_history(child.info.run_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(FAST["epochs"]))
    logged = {a.path for a in client.list_artifacts(child.info.run_id, "model")}
    assert {"model/flow.pt", "model/history.json"} <= logged

    # A second run reuses the trained flow (content-hashed cache): nothing is trained again.
    models = sorted((tmp_path / "cache" / "models").iterdir())
    stamps = [p.stat().st_mtime_ns for p in models]
    assert main(["run", str(params), "--quiet"]) == 0
    assert sorted((tmp_path / "cache" / "models").iterdir()) == models
    assert [p.stat().st_mtime_ns for p in models] == stamps


def test_stacked_layers_make_one_scale_that_also_separates(product):
    """``stack``: the layers on the first grid, concatenated, as one whitened scale."""
    _, train, test = product
    detector = MSFlow(MSFlowParams(**dict(FAST, epochs=4, stack=True))).fit(train)
    assert detector.shapes_ == [(40 + 112, 8, 8)]
    scores, _ = detector.score(test)
    assert image_metrics(test.labels, scores, float(np.median(scores)))["image_auroc"] >= 0.9
