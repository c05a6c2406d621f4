"""PaDiM and the feature-level ensemble (SimpleNet-style discriminator) on tiny generated images."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from defectflow.tasks.feature_settings import FeatureSettings
from defectflow.tasks import datasets, features as features_mod
from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.methods import PatchSet
from defectflow.tasks.methods.ensemble import (FeatureEnsemble, FeatureEnsembleParams,
                                               logistic_loss, make_adaptor,
                                               principal_components, truncated_l1_loss)
from defectflow.tasks.methods.padim import PaDiM, PaDiMParams
from defectflow.tasks.normalization import channel_stats
from defectflow.tasks.patches import plan_patches

LAYERS = ("blocks.2", "blocks.4")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The discriminator trains on tiny batches here; on a loaded 2-core machine a second
    intra-op thread made that 6x slower (spin-waiting), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- hand-made feature stores --------------------------------------------------------
class ArrayStore:
    """In-memory stand-in for FeatureStoreRef: ``maps(layer)`` gives (n, C, h, w)."""

    def __init__(self, maps: dict[str, np.ndarray]):
        self._maps = maps

    def maps(self, layer: str) -> np.ndarray:
        return self._maps[layer]


def array_set(maps: dict[str, np.ndarray], input_size: int) -> PatchSet:
    n = len(next(iter(maps.values())))
    table = pd.DataFrame({"patch_id": [f"p{i}" for i in range(n)], "label": np.zeros(n, int)})
    return PatchSet(table, ArrayStore(maps), np.arange(n), {}, input_size, (0.0,) * 3, (1.0,) * 3)


def hand_made_maps(rng, n):
    """Layer "a": 3 channels on a 2x2 grid; layer "b": 2 channels on 1x1 (upsampled: constant)."""
    spread = np.array([1.0, 2.0, 0.5])[:, None, None]
    return {"a": (50 + rng.normal(size=(n, 3, 2, 2)) * spread).astype(np.float32),
            "b": rng.normal(size=(n, 2, 1, 1)).astype(np.float32)}


def stacked(maps):
    """The 5 concatenated channels per position, (n, 4, 5), built with numpy only."""
    a, b = maps["a"], maps["b"]
    both = np.concatenate([a, np.broadcast_to(b, (len(b), 2, 2, 2))], axis=1)
    return both.reshape(len(a), 5, 4).transpose(0, 2, 1).astype(np.float64)


def test_padim_gaussians_and_mahalanobis_equal_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    train_maps, test_maps = hand_made_maps(rng, 40), hand_made_maps(rng, 5)
    test_maps["a"][0, 1, 0, 1] += 8.0          # an outlier at position (0, 1) of image 0
    # shrinkage 0: the paper's Sigma + eps I (the shrunk default is checked below).
    params = PaDiMParams(layers=("a", "b"), n_channels=5, eps=0.01, shrinkage=0.0,
                         smoothing_sigma=0)
    # input_size 2 = the grid, so upsampling is the identity and the map is the distance map.
    detector = PaDiM(params).fit(array_set(train_maps, 2))
    assert detector.channels.tolist() == [0, 1, 2, 3, 4]

    x = stacked(train_maps)
    for p in range(4):
        np.testing.assert_allclose(detector.mean[p], x[:, p].mean(axis=0), rtol=1e-5)
        inverse = np.linalg.inv(np.cov(x[:, p].T) + 0.01 * np.eye(5))
        np.testing.assert_allclose(detector.inverse_cov[p], inverse, rtol=1e-4, atol=1e-5)

    scores, maps = detector.score(array_set(test_maps, 2))
    q = stacked(test_maps)
    expected = np.array([[scipy_mahalanobis(q[i, p], x[:, p].mean(axis=0),
                                            np.linalg.inv(np.cov(x[:, p].T) + 0.01 * np.eye(5)))
                          for p in range(4)] for i in range(len(q))]).reshape(-1, 2, 2)
    np.testing.assert_allclose(maps, expected, rtol=1e-4)
    np.testing.assert_allclose(scores, expected.reshape(len(q), -1).max(axis=1), rtol=1e-4)
    assert np.unravel_index(maps[0].argmax(), (2, 2)) == (0, 1) and scores[0] > scores[1:].max()


def test_padim_shrinks_each_covariance_toward_the_pooled_one():
    rng = np.random.default_rng(5)
    train_maps = hand_made_maps(rng, 12)
    x = stacked(train_maps)                                       # (12, 4, 5)
    covs = np.stack([np.cov(x[:, p].T) for p in range(4)])
    pooled = covs.mean(axis=0)

    def inverses(**kwargs):
        params = PaDiMParams(layers=("a", "b"), n_channels=5, smoothing_sigma=0, **kwargs)
        return PaDiM(params).fit(array_set(train_maps, 2)).inverse_cov

    # Default: the weight of d pseudo-images against n - 1 degrees of freedom, 5 / (5 + 11).
    a = 5 / 16
    for p, inverse in enumerate(inverses()):
        expected = np.linalg.inv((1 - a) * covs[p] + a * pooled + 0.01 * np.eye(5))
        np.testing.assert_allclose(inverse, expected, rtol=1e-4, atol=1e-5)
    # Full shrinkage: one covariance for every position.
    shared = inverses(shrinkage=1.0)
    np.testing.assert_allclose(shared, np.broadcast_to(shared[0], shared.shape), rtol=1e-5)
    np.testing.assert_allclose(shared[0], np.linalg.inv(pooled + 0.01 * np.eye(5)), rtol=1e-4)


def test_padim_channel_subset_is_seeded_and_capped():
    rng = np.random.default_rng(1)
    maps = {"a": rng.normal(size=(6, 30, 2, 2)).astype(np.float32),
            "b": rng.normal(size=(6, 20, 1, 1)).astype(np.float32)}

    def channels(**kwargs):
        return PaDiM(PaDiMParams(layers=("a", "b"), **kwargs)).fit(array_set(maps, 4)).channels

    assert channels(n_channels=100).tolist() == list(range(50))       # capped at the 50 channels
    first = channels(n_channels=10, seed=3)
    assert len(first) == 10 and len(set(first)) == 10 and first.max() < 50
    np.testing.assert_array_equal(channels(n_channels=10, seed=3), first)
    assert not np.array_equal(channels(n_channels=10, seed=4), first)

    # Three layers: the third joins the first grid too.
    maps["c"] = rng.normal(size=(6, 10, 1, 1)).astype(np.float32)
    three = PaDiM(PaDiMParams(layers=("a", "b", "c"))).fit(array_set(maps, 4))
    assert three.mean.shape == (4, 60) and three.inverse_cov.shape == (4, 60, 60)


def test_principal_components_recover_known_axes():
    rng = np.random.default_rng(2)
    rotation, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    variances = np.array([25.0, 9.0, 4.0, 1.0, 0.25, 0.01])
    covariance = rotation @ np.diag(variances) @ rotation.T
    components, found = principal_components(covariance, 3)
    assert components.shape == (3, 6)
    np.testing.assert_allclose(found, variances[:3], rtol=1e-5)
    # The same axes up to sign, each with its largest entry positive.
    np.testing.assert_allclose(np.abs(components @ rotation[:, :3]), np.eye(3), atol=1e-5)
    assert (components[np.arange(3), np.abs(components).argmax(axis=1)] > 0).all()
    assert principal_components(covariance, 99)[0].shape == (6, 6)   # capped at D


def test_truncated_l1_loss_is_zero_past_the_margin():
    assert truncated_l1_loss(torch.tensor([0.6, 2.0]), torch.tensor([-0.5, -3.0]), 0.5) == 0
    # true 0 misses by 0.5, fake 0.5 misses by 1.0
    assert truncated_l1_loss(torch.tensor([0.0]), torch.tensor([0.5]), 0.5) == pytest.approx(1.5)


def test_logistic_loss_is_minimized_at_the_log_density_ratio():
    # Where normal features make up a share p of what the discriminator sees at a point and
    # fakes q, the best score is log(p / q): graded, not flat past a margin.
    assert logistic_loss(torch.tensor([0.0]), torch.tensor([0.0])) == pytest.approx(2 * np.log(2))
    for p, q in ((0.8, 0.2), (0.5, 0.5), (0.1, 0.9)):
        d = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.LBFGS([d], max_iter=100)

        def closure():
            optimizer.zero_grad()
            softplus = torch.nn.functional.softplus
            loss = (p * softplus(-d) + q * softplus(d)).sum()
            loss.backward()
            return loss
        optimizer.step(closure)
        assert d.item() == pytest.approx(np.log(p / q), abs=1e-4)
    # The mean form the training uses: the same as the pairwise one.
    true, fake = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 3.0, 0.0])
    expected = np.mean(np.log1p(np.exp(-true.numpy()))) + np.mean(np.log1p(np.exp(fake.numpy())))
    assert logistic_loss(true, fake).item() == pytest.approx(expected, rel=1e-6)


def test_the_adaptor_starts_as_the_identity_and_keeps_every_direction():
    # A Xavier-initialized square matrix would shrink some directions to almost nothing,
    # different ones for every seed; training starts from the features as the PCA gave them.
    features = torch.randn(50, 64)
    with torch.no_grad():
        assert torch.equal(make_adaptor(64)(features), features)
        assert torch.linalg.svdvals(make_adaptor(64).weight).min() == 1


def test_params_reject_bad_values():
    for bad in (dict(layers=()), dict(layers=("a", "a")), dict(layers=("a", "b", "c", "d")),
                dict(n_channels=0), dict(eps=0), dict(smoothing_sigma=-1), dict(shrinkage=1.5),
                dict(shrinkage=-0.1)):
        with pytest.raises(ValueError):
            PaDiMParams(**bad)
    for bad in (dict(layers=()), dict(layers=("a", "a")), dict(n_components=0), dict(epochs=0),
                dict(noise_std=0), dict(lr_discriminator=-1), dict(batch_size=0),
                dict(border_pooling="same"), dict(loss="hinge"), dict(lr_schedule="step")):
        with pytest.raises(ValueError):
            FeatureEnsembleParams(**bad)
    # One layer is a combined feature source's (features.sources).
    assert PaDiMParams(layers=("combined",)).layers == FeatureEnsembleParams(
        layers=("combined",)).layers == ("combined",)


# -- the generated product -----------------------------------------------------------
@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from conftest import make_folder_dataset

    tmp = tmp_path_factory.mktemp("padim_ensemble")
    root = make_folder_dataset(tmp / "product", n_good=30, n_bad=8)
    manifest = datasets.scan_dataset("folder", root).manifest
    patches = plan_patches(manifest)
    paths = dict(zip(manifest.image_id, manifest.path))
    stats = channel_stats(patches[patches.split == "train"], paths)
    store = features_mod.extract_features(
        patches, manifest, FeatureSettings(layers=LAYERS, input_size=64),
        mean=stats["mean"], std=stats["std"], cache_dir=tmp / "cache", progress=False)

    def subset(split):
        pos = np.flatnonzero((patches["split"] == split).to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), store, pos, paths, 64,
                        tuple(stats["mean"]), tuple(stats["std"]))

    return manifest, subset("train"), subset("test")


def defect_masks_and_maps(manifest, test, maps):
    import cv2
    from defectflow.tasks.images import read_mask

    mask_paths = manifest.set_index("image_id")["mask_path"]
    masks, defect_maps = [], []
    for image_id, amap in zip(test.table["image_id"], maps):
        if isinstance(mask_paths[image_id], str):
            masks.append(cv2.resize(read_mask(mask_paths[image_id]).astype(np.uint8), (64, 64),
                                    interpolation=cv2.INTER_NEAREST) > 0)
            defect_maps.append(amap)
    return masks, defect_maps


def test_padim_separates_generated_defects_and_round_trips(product, tmp_path):
    manifest, train, test = product
    detector = PaDiM(PaDiMParams(layers=LAYERS)).fit(train)
    assert detector.mean.shape == (8 * 8, 100) and detector.inverse_cov.shape == (64, 100, 100)
    assert detector.inverse_cov.dtype == np.float32
    scores, maps = detector.score(test)
    assert scores.dtype == np.float32 and maps.shape == (len(test), 64, 64)
    np.testing.assert_allclose(scores, maps.reshape(len(test), -1).max(axis=1))
    labels = test.labels
    assert image_metrics(labels, scores, float(np.median(scores)))["image_auroc"] >= 0.9
    assert pixel_metrics(*defect_masks_and_maps(manifest, test, maps))["pixel_auroc"] >= 0.85

    restored = PaDiM.load(detector.save(tmp_path / "padim"))
    restored_scores, restored_maps = restored.score(test)
    np.testing.assert_allclose(restored_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(restored_maps, maps, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ensemble(product):
    _, train, _ = product
    # Many small batches: the tiny set has only 24 x 64 positions.
    params = FeatureEnsembleParams(layers=LAYERS, n_components=64, epochs=15, batch_size=128)
    return FeatureEnsemble(params).fit(train)


def test_ensemble_pca_reduces_to_n_components_and_training_loss_decreases(product, ensemble):
    _, train, _ = product
    assert ensemble.components.shape == (64, 40 + 112)            # blocks.2 + blocks.4 channels
    np.testing.assert_allclose(ensemble.components @ ensemble.components.T, np.eye(64), atol=1e-4)
    reduced = torch.cat([ensemble._reduced(maps, "cpu")[0]
                         for _, maps in train.feature_chunks(LAYERS)])
    assert reduced.shape == (len(train) * 8 * 8, 64)
    assert reduced.mean(dim=0).abs().max() < 1e-3                 # centred on the training mean
    assert reduced.var(dim=0).mean() == pytest.approx(1.0, rel=1e-2)   # unit mean variance
    variances = reduced.var(dim=0)
    assert (variances[:-1] >= variances[1:] - 1e-4).all()         # leading components first

    curve = ensemble.history["train_loss"]
    assert len(curve) == 15
    # The logistic loss of a discriminator that cannot tell normal from fake is 2 log 2.
    assert curve[-1] < min(curve[:5]) and curve[-1] < 0.95 * 2 * np.log(2) < curve[0]


def test_ensemble_separates_generated_defects_and_round_trips(product, ensemble, tmp_path):
    manifest, _, test = product
    scores, maps = ensemble.score(test)
    assert scores.dtype == np.float32 and maps.shape == (len(test), 64, 64)
    labels = test.labels
    assert image_metrics(labels, scores, float(np.median(scores)))["image_auroc"] >= 0.9
    assert pixel_metrics(*defect_masks_and_maps(manifest, test, maps))["pixel_auroc"] >= 0.7

    folder = ensemble.save(tmp_path / "ensemble")
    assert {"pca.npz", "adaptor.pt", "discriminator.pt", "history.json"} <= {
        p.name for p in folder.iterdir()}
    restored = FeatureEnsemble.load(folder)
    assert restored.history == ensemble.history
    restored_scores, restored_maps = restored.score(test)
    np.testing.assert_allclose(restored_scores, scores, rtol=1e-5)
    np.testing.assert_allclose(restored_maps, maps, rtol=1e-5, atol=1e-6)

    # A model saved before border_pooling, loss and lr_schedule existed was fitted on "valid"
    # pooling with SimpleNet's loss at a constant rate: it loads so, and scores as before.
    meta = json.loads((folder / "detector.json").read_text())
    assert meta["params"].pop("border_pooling") == "zero_padded"
    assert meta["params"].pop("loss") == "logistic"
    assert meta["params"].pop("lr_schedule") == "cosine"
    (folder / "detector.json").write_text(json.dumps(meta))
    old = FeatureEnsemble.load(folder)
    assert (old.params.border_pooling, old.params.loss, old.params.lr_schedule) == (
        "valid", "truncated_l1", "constant")
    assert not np.allclose(old.score(test)[1], maps)


def test_ensemble_training_is_seeded(product):
    _, train, _ = product
    params = dict(layers=LAYERS, n_components=8, epochs=2, batch_size=256, hidden=32)
    def curve(**extra):
        params_ = FeatureEnsembleParams(**params, **extra)
        return FeatureEnsemble(params_).fit(train).history["train_loss"]

    first = curve()
    assert curve() == first and curve(seed=1) != first


def test_the_cosine_schedule_brings_both_learning_rates_to_zero(product, monkeypatch):
    # Every step's rates, read from the optimizers as training runs: cosine from the set rates
    # to 0 at the last step; "constant" keeps them.
    _, train, _ = product
    seen = []
    step = torch.optim.Adam.step

    def recording_step(optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    params = dict(layers=LAYERS, n_components=8, epochs=3, batch_size=256, hidden=32,
                  lr_discriminator=1e-3, lr_adaptor=1e-4)
    FeatureEnsemble(FeatureEnsembleParams(**params)).fit(train)
    steps = 3 * -(-len(train) * 8 * 8 // 256)
    disc, adaptor = seen[0::2], seen[1::2]
    assert len(disc) == len(adaptor) == steps
    assert disc[0] == 1e-3 and adaptor[0] == 1e-4
    assert all(a >= b for a, b in zip(disc, disc[1:]))
    assert disc[-1] < 1e-3 * 0.01 and adaptor[-1] < 1e-4 * 0.01
    seen.clear()
    FeatureEnsemble(FeatureEnsembleParams(**params, lr_schedule="constant")).fit(train)
    assert set(seen[0::2]) == {1e-3} and set(seen[1::2]) == {1e-4}
