"""Synthetic-defect augmentations and the CutPaste detector on tiny generated images."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectflow.tasks import datasets
from defectflow.tasks.methods.augmentations import (AUGMENTATIONS, REFERENCE_SIDE, arc_scar, black_dot,
                                            cutpaste_basic, cutpaste_scar, white_dot_black_border)
from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.images import read_mask
from defectflow.tasks.methods.base import PatchSet
from defectflow.tasks.methods.cutpaste import CutPaste, CutPasteParams, subpatch_windows
from defectflow.tasks.methods.cutpaste_net import EarlyStopping, GaussianDensity, encoder_stages
from defectflow.tasks.normalization import channel_stats
from defectflow.tasks.patches import plan_patches

SEEDS = range(12)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These tiny problems gain nothing from a second thread, and on a loaded
    # 2-core machine the spin-waiting of OpenMP and OpenBLAS threads makes two
    # threads 10-40x slower (a 1280-dim Cholesky: 0.04 s on one, 1.4 s on two).
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------- augmentations


def noise_image(size: int, seed: int = 0) -> np.ndarray:
    """Every pixel differs from its neighbours, so any pasted pixel shows as a change."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def flat_image(size: int) -> np.ndarray:
    return np.full((size, size, 3), 128, np.uint8)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return (before != after).any(axis=2)


def extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) of the bounding box of the True pixels."""
    ys, xs = np.nonzero(mask)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("size", [REFERENCE_SIDE, 64])
def test_augmentations_change_a_small_region_and_leave_the_input_alone(name, size):
    augment = AUGMENTATIONS[name]
    image = noise_image(size) if name in ("cutpaste", "scar") else flat_image(size)
    original = image.copy()
    for seed in SEEDS:
        out = augment(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        fraction = changed(image, out).mean()
        assert 0 < fraction <= 0.16, (name, seed, fraction)  # cut-paste: at most 15 % of the area
    np.testing.assert_array_equal(image, original)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentations_are_reproducible_from_the_seed(name):
    image = noise_image(96, seed=3)
    first = AUGMENTATIONS[name](image, np.random.default_rng(7))
    np.testing.assert_array_equal(first, AUGMENTATIONS[name](image, np.random.default_rng(7)))
    others = [AUGMENTATIONS[name](image, np.random.default_rng(seed)) for seed in (8, 9, 10)]
    assert any(not np.array_equal(first, other) for other in others)


def test_cutpaste_basic_pastes_a_rectangle_of_2_to_15_percent():
    image = noise_image(REFERENCE_SIDE)
    area = image.shape[0] * image.shape[1]
    for seed in SEEDS:
        region = changed(image, cutpaste_basic(image, np.random.default_rng(seed)))
        height, width = extent(region)
        # Noise makes (nearly) every pasted pixel a change, so the change is the rectangle.
        assert region.sum() == height * width
        assert 0.02 * area * 0.97 <= height * width <= 0.15 * area * 1.03
        assert 0.3 * 0.9 <= width / height <= 3.3 / 0.9


def test_cutpaste_scar_is_a_thin_rotated_strip_of_thesis_size():
    image = noise_image(REFERENCE_SIDE)
    longest = np.hypot(12, 50)
    for seed in SEEDS:
        region = changed(image, cutpaste_scar(image, np.random.default_rng(seed)))
        height, width = extent(region)
        # Rotation by at most 45 degrees keeps it elongated; nearest-neighbour keeps its area.
        assert 20 * np.cos(np.radians(45)) - 2 <= max(height, width) <= longest + 2
        assert 2 * 20 * 0.7 <= region.sum() <= 12 * 50 * 1.1


def test_dots_have_the_thesis_diameters_and_fade_outwards():
    image = flat_image(REFERENCE_SIDE)
    for seed in SEEDS:
        out = black_dot(image, np.random.default_rng(seed))
        region = changed(image, out)
        assert max(extent(region)) <= 10 + 1
        grey = out.astype(int)[..., 0]
        ys, xs = np.nonzero(region)
        darkest = np.unravel_index(np.argmin(grey), grey.shape)
        # Opacity falls off radially: the darkest pixel is the centre of the dot.
        assert abs(darkest[0] - ys.mean()) <= 1 and abs(darkest[1] - xs.mean()) <= 1
        assert grey[region].max() > grey.min() + 20   # the edge blends into the background

        out = white_dot_black_border(image, np.random.default_rng(seed))
        region = changed(image, out)
        assert max(extent(region)) <= 12 + 1
        grey = out.astype(int)[..., 0]
        assert grey.max() > 128 + 60 and grey.min() < 128 - 30   # white inside, black ring
        centre = np.unravel_index(np.argmax(grey), grey.shape)
        ring = np.unravel_index(np.argmin(grey), grey.shape)
        assert np.hypot(*np.subtract(ring, centre)) >= 1.5   # the black part surrounds the white


def test_arc_scar_is_a_thin_sixty_degree_arc():
    image = flat_image(REFERENCE_SIDE)
    for seed in SEEDS:
        region = changed(image, arc_scar(image, np.random.default_rng(seed)))
        longest = max(extent(region))
        # The chord of a 60 degree arc equals its radius (35-90 px); the ends fade.
        assert 25 <= longest <= 90 + 5 + 2
        # Area / length ~ stroke thickness (5 px, thinner where it fades).
        assert 3 <= region.sum() / longest <= 8


def test_defect_sizes_scale_with_the_image():
    image = flat_image(64)
    scale = 64 / REFERENCE_SIDE
    for seed in SEEDS:
        rng = np.random.default_rng
        assert max(extent(changed(image, black_dot(image, rng(seed))))) <= 10 * scale + 2
        white = white_dot_black_border(image, rng(seed))
        assert max(extent(changed(image, white))) <= 12 * scale + 2
        assert max(extent(changed(image, arc_scar(image, rng(seed))))) <= 95 * scale + 2
        noise = noise_image(64)
        scar = cutpaste_scar(noise, rng(seed))
        assert max(extent(changed(noise, scar))) <= np.hypot(12, 50) * scale + 2


# ------------------------------------------------------------------------- helpers


def test_early_stopping_waits_patience_epochs_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert stopper.step(1.0) and not stopper.should_stop
    assert stopper.step(0.8)
    assert not stopper.step(0.85) and not stopper.should_stop
    assert not stopper.step(0.8) and stopper.should_stop   # equal is no improvement
    strict = EarlyStopping(patience=1, min_delta=0.1)
    assert strict.step(1.0)
    assert not strict.step(0.95) and strict.should_stop    # better, but by less than min_delta


def test_gaussian_density_distance_is_the_mahalanobis_distance():
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 5.0])
    density = GaussianDensity.fit(rng.normal(size=(20000, 3)) * scales + 10)
    np.testing.assert_allclose(density.mean, [10, 10, 10], atol=0.1)
    points = np.array([[10, 10, 10], [13, 10, 10], [10, 16, 10], [10, 10, 25]], float)
    np.testing.assert_allclose(density.distance(points), [0, 3, 3, 3], atol=0.1)


def test_subpatch_windows_cover_the_input_and_maps_average_the_overlaps():
    windows = subpatch_windows(64, 32, 16)
    assert len(windows) == 9
    cover = np.zeros((64, 64), int)
    for x, y in windows:
        cover[y:y + 32, x:x + 32] += 1
    assert cover.min() >= 1

    detector = CutPaste(CutPasteParams(smoothing_sigma=0))
    scores = np.zeros(len(windows))
    scores[windows.index((32, 32))] = 4.0     # only the bottom-right sub-patch is anomalous
    amap = detector._anomaly_map(scores, windows, 32, 64)
    assert amap[63, 63] == 4.0                # covered by that sub-patch alone
    assert amap[40, 40] == pytest.approx(1.0)  # four sub-patches overlap there, one anomalous
    assert amap[:16, :].max() == 0 and amap[:, :16].max() == 0


def test_params_reject_bad_values():
    assert CutPasteParams(augmentations=["black_dot"]).augmentations == ("black_dot",)
    assert CutPasteParams(variant="nway", augmentations=["scar", "arc_scar"]).class_names == (
        "normal", "scar", "arc_scar")
    assert CutPasteParams(variant="3way").class_names == ("normal", "cutpaste", "scar")
    for bad in (dict(augmentations=["blur"]), dict(augmentations=[]), dict(variant="4way"),
                dict(variant="3way", augmentations=["black_dot", "scar"]),
                dict(encoder="vgg16"), dict(embedding="logits"), dict(epochs=0),
                dict(patience=0), dict(validation_fraction=1.0), dict(finetune_stages=-1),
                dict(loc_patch=4), dict(smoothing_sigma=-1), dict(images_per_epoch=0)):
        with pytest.raises(ValueError):
            CutPasteParams(**bad)


@pytest.mark.parametrize("variant, augmentations, targets", [
    ("binary", ("black_dot", "arc_scar"), [0, 1, 0, 1, 0, 1]),
    ("3way", ("cutpaste", "scar"), [0, 1, 2] * 3),
    ("nway", ("white_dot", "scar", "arc_scar"), [0, 1, 2, 3] * 3),
])
def test_training_views_pair_each_image_with_its_augmented_versions(variant, augmentations,
                                                                    targets):
    detector = CutPaste(CutPasteParams(variant=variant, augmentations=augmentations))
    images = np.stack([flat_image(32), noise_image(32, 1), noise_image(32, 2)])
    inputs, labels = detector._views(images, np.random.default_rng(0), (0.5,) * 3, (0.25,) * 3)
    assert labels.tolist() == targets and inputs.shape == (len(targets), 3, 32, 32)
    per_image = len(targets) // len(images)
    for k, image in enumerate(images):
        normal = (image.transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
        views = inputs[k * per_image:(k + 1) * per_image].numpy()
        np.testing.assert_allclose(views[0], normal, atol=1e-5)   # the normal view is untouched
        for view in views[1:]:
            assert not np.allclose(view, normal)                 # every other view has a defect


def test_projection_head_follows_the_thesis():
    from defectflow.tasks.methods.cutpaste_net import CutPasteNet

    net = CutPasteNet("efficientnet_lite0", CutPasteParams().head_layers, 2, pretrained=False)
    linears = [m for m in net.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(1280, 512)] + [(512, 512)] * 6 + [(512, 128)])
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net.head) == 8
    assert sum(isinstance(m, nn.ReLU) for m in net.head) == 8
    assert (net.classifier.in_features, net.classifier.out_features) == (128, 2)


# ------------------------------------------------------------------------ detector


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    from conftest import prepared_product

    manifest, patches, paths, stats = prepared_product(
        tmp_path_factory.mktemp("data") / "product")

    def subset(splits, limit=None):
        pos = np.flatnonzero(patches["split"].isin(splits).to_numpy())[:limit]
        return PatchSet(patches.iloc[pos].reset_index(drop=True), None, pos, paths, 64,
                        tuple(stats["mean"]), tuple(stats["std"]))

    masks = {}
    for row in manifest.itertuples():
        if isinstance(row.mask_path, str):
            masks[row.image_id] = cv2.resize(read_mask(row.mask_path).astype(np.uint8), (64, 64),
                                             interpolation=cv2.INTER_NEAREST) > 0
    return SimpleNamespace(subset=subset, masks=masks)


# Test settings, not defaults: few epochs, small batches (more steps on 24 images),
# a faster learning rate, finer sub-patches for 64 px inputs.
FAST = dict(epochs=3, batch_size=16, learning_rate=0.01, validation_fraction=0.2,
            loc_patch=16, loc_stride=8, loc_fit_images=8)


@pytest.fixture(scope="module")
def fitted(product):
    detector = CutPaste(CutPasteParams(**FAST)).fit(product.subset(["train"]))
    test = product.subset(["test"])
    scores, maps = detector.score(test)
    return SimpleNamespace(detector=detector, test=test, scores=scores, maps=maps)


def test_cutpaste_separates_generated_defects_and_localizes_them(product, fitted):
    test, scores, maps = fitted.test, fitted.scores, fitted.maps
    assert scores.shape == (len(test),) and scores.dtype == np.float32
    assert maps.shape == (len(test), 64, 64) and maps.dtype == np.float32
    labels = test.labels
    assert image_metrics(labels, scores, float(np.median(scores)))["image_auroc"] >= 0.85
    defective = [i for i, image_id in enumerate(test.table.image_id) if image_id in product.masks]
    masks = [product.masks[test.table.image_id[i]] for i in defective]
    assert pixel_metrics(masks, [maps[i] for i in defective])["pixel_auroc"] >= 0.85


def test_history_has_one_entry_per_epoch(fitted):
    history = fitted.detector.history
    assert set(history) == {"train_loss", "val_loss", "val_accuracy"}
    assert len(history["train_loss"]) == len(history["val_loss"]) == len(history["val_accuracy"])
    assert 1 <= len(history["train_loss"]) <= FAST["epochs"]
    assert all(np.isfinite(history["train_loss"])) and all(np.isfinite(history["val_loss"]))


def test_save_load_round_trip_reproduces_scores_and_maps(fitted, tmp_path):
    restored = CutPaste.load(fitted.detector.save(tmp_path / "model"))
    assert restored.history == fitted.detector.history
    scores, maps = restored.score(fitted.test)
    np.testing.assert_allclose(scores, fitted.scores, rtol=1e-4)
    np.testing.assert_allclose(maps, fitted.maps, rtol=1e-4, atol=1e-4)


def test_gradcam_maps_of_the_trained_network(fitted):
    detector, test = fitted.detector, fitted.test
    cams = detector.gradcam_maps(test)
    assert cams.shape == (len(test), 64, 64) and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0
    assert cams.reshape(len(test), -1).std(axis=1).max() > 0   # not flat
    early = detector.gradcam_maps(test, layer="blocks.2")
    assert early.shape == cams.shape and not np.allclose(early, cams)
    with pytest.raises(ValueError):
        detector.gradcam_maps(test, layer="layer4")   # a ResNet stage, not Lite0's
    assert encoder_stages("efficientnet_lite0")[-1] == "head"


class DarknessNet(nn.Module):
    """A stand-in network whose anomaly logit is the image's mean darkness."""

    def __init__(self):
        super().__init__()
        self.encoder = SimpleNamespace(stage_names=["darkness"])
        self.darkness = nn.Conv2d(3, 2, kernel_size=1)
        with torch.no_grad():
            self.darkness.weight.fill_(-1.0)
            self.darkness.bias.zero_()

    def forward(self, x, capture=None):
        activation = self.darkness(x)
        anomaly = F.relu(activation).mean(dim=(1, 2, 3))
        logits = torch.stack([torch.zeros_like(anomaly), anomaly], dim=1)
        return None, None, logits, activation if capture == "darkness" else None


def test_gradcam_points_at_what_drives_the_anomaly_logit(product):
    # The generated defects are dark blobs: a network that scores darkness must
    # get Grad-CAM maps that are higher on the defect than around it.
    detector = CutPaste(CutPasteParams())
    detector.network = DarknessNet()
    test = product.subset(["test"])
    cams = detector.gradcam_maps(test)
    assert cams.shape == (len(test), 64, 64)
    for image_id, cam in zip(test.table.image_id, cams):
        if image_id in product.masks:
            mask = product.masks[image_id]
            assert cam[mask].mean() > 1.5 * cam[~mask].mean()


def test_early_stopping_ends_training_and_fits_are_reproducible(product):
    # With learning rate 0 and min_delta 10 no epoch after the first can improve.
    params = CutPasteParams(epochs=5, patience=1, learning_rate=0.0, min_delta=10.0,
                            batch_size=8, validation_fraction=0.25, loc_fit_images=1)
    train = product.subset(["train"], limit=8)
    detector = CutPaste(params).fit(train)
    assert len(detector.history["train_loss"]) == 2
    assert len(detector.history["val_loss"]) == 2
    # The same seed draws the same hold-out, augmentations and weights.
    again = CutPaste(params).fit(train)
    assert again.history == detector.history
    np.testing.assert_array_equal(again.image_density.mean, detector.image_density.mean)
