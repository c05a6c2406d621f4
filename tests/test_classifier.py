"""The fine-tuned good-vs-defective classifier on tiny generated images."""

import cv2
import numpy as np
import pytest
import torch

from defectflow.tasks import datasets
from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.evaluation import image_metrics, pixel_metrics
from defectflow.tasks.images import read_mask
from defectflow.tasks.methods import PatchSet
from defectflow.tasks.methods.classifier import (ClassifierParams, FineTunedClassifier,
                                                 class_weights)
from defectflow.tasks.normalization import channel_stats
from defectflow.tasks.patches import plan_patches

# 128 px: Grad-CAM explains the stride-32 stage, a 4x4 grid here (2x2 at 64 px cannot localize).
SIZE = 128
N_LABELLED = 4
# Fast settings for 28 training images (the defaults are for hundreds of images;
# 1e-3 over-shoots on some draws of the data).
FAST = dict(lr=3e-4, epochs=4, batch_size=16)


@pytest.fixture(scope="module")
def product(tmp_path_factory):
    """Train: the good training images + 4 labelled defective ones; test: the rest."""
    from conftest import make_folder_dataset

    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "product", n_good=30, n_bad=12,
                               size=SIZE)
    manifest = datasets.scan_dataset("folder", root).manifest
    patches = plan_patches(manifest)
    paths = dict(zip(manifest.image_id, manifest.path))
    stats = channel_stats(patches[patches.split == "train"], paths)
    labelled = patches.loc[patches.label == 1, "image_id"].sort_values().to_numpy()[:N_LABELLED]

    def subset(selected, input_size=SIZE):
        # The classifier reads pixels only (input_batches), so no feature store is needed.
        pos = np.flatnonzero(selected.to_numpy())
        return PatchSet(patches.iloc[pos].reset_index(drop=True), None, pos, paths, input_size,
                        tuple(stats["mean"]), tuple(stats["std"]))

    in_train = (patches.split == "train") | patches.image_id.isin(labelled)
    in_test = (patches.split == "test") & ~patches.image_id.isin(labelled)
    return dict(manifest=manifest, train=subset(in_train), test=subset(in_test),
                good_only=subset(patches.split == "train"),
                # Tests of the training mechanics need no localization: 64 px inputs are faster.
                small_train=subset(in_train, 64), small_test=subset(in_test, 64),
                # 8 good + the 4 labelled: augmentation reruns the network every epoch.
                tiny_train=subset(patches.image_id.isin(
                    list(patches.image_id[patches.split == "train"][:8]) + list(labelled)), 64))


def test_classifier_separates_and_localizes_defects_and_round_trips(product, tmp_path):
    manifest, train, test = product["manifest"], product["train"], product["test"]
    assert train.labels.sum() == N_LABELLED and test.labels.sum() == 12 - N_LABELLED

    detector = FineTunedClassifier(ClassifierParams(**FAST)).fit(train)
    assert len(detector.history["train_loss"]) == FAST["epochs"]
    assert detector.history["train_loss"][-1] < detector.history["train_loss"][0]

    scores, maps = detector.score(test)
    labels = test.labels
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    assert maps.shape == (len(test), SIZE, SIZE)
    assert image_metrics(labels, scores, 0.5)["image_auroc"] >= 0.9
    # The reports' metric: accuracy of "probability >= 0.5".
    accuracy = detector.accuracy(test)
    assert accuracy == pytest.approx(((scores >= 0.5) == (labels == 1)).mean())
    assert accuracy >= 0.8

    # Maps lie in [0, score]; a map with any evidence peaks at its image's score.
    assert maps.min() >= 0 and np.all(maps.max(axis=(1, 2)) <= scores + 1e-6)
    peaks = maps.max(axis=(1, 2))
    evidenced = peaks > 0
    assert evidenced[labels == 1].all()
    np.testing.assert_allclose(peaks[evidenced], scores[evidenced], rtol=1e-5)

    # Grad-CAM points at the blob: pixel AUROC over the defective images.
    masks, defect_maps = [], []
    mask_paths = manifest.set_index("image_id")["mask_path"]
    for image_id, amap in zip(test.table.image_id, maps):
        if isinstance(mask_paths[image_id], str):
            mask = read_mask(mask_paths[image_id]).astype(np.uint8)
            masks.append(cv2.resize(mask, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0)
            defect_maps.append(amap)
    assert len(masks) == 12 - N_LABELLED
    assert pixel_metrics(masks, defect_maps)["pixel_auroc"] >= 0.75

    saved = detector.save(tmp_path / "model")
    assert (saved / "history.json").is_file()
    restored = FineTunedClassifier.load(saved)
    assert restored.history == detector.history
    restored_scores, restored_maps = restored.score(test)
    np.testing.assert_allclose(restored_scores, scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(restored_maps, maps, rtol=1e-4, atol=1e-6)


def _changed_parts(detector: FineTunedClassifier) -> set[str]:
    """Names of the stages (and "head") whose parameters differ from a freshly built network:
    the ImageNet weights and, with the same seed, the same initial head."""
    reference = FineTunedClassifier(detector.params)
    reference._new_network()
    before = dict(reference.network.named_parameters())
    names = detector.network.names
    changed = set()
    for key, value in detector.network.named_parameters():
        if not torch.equal(value, before[key]):
            changed.add("head" if key.startswith("head.") else names[int(key.split(".")[1])])
    return changed


def test_unfreeze_head_and_last_stage_train_only_those_parameters(product):
    train = product["small_train"]
    head_only = FineTunedClassifier(ClassifierParams(unfreeze="head", epochs=1, lr=1e-3))
    assert _changed_parts(head_only.fit(train)) == {"head"}

    partial = FineTunedClassifier(ClassifierParams(unfreeze="last_stage", epochs=1, lr=1e-3))
    # EfficientNet-Lite0's last stage and head conv (ResNet's layer4), plus the new head.
    assert _changed_parts(partial.fit(train)) == {"blocks.6", "conv_head", "head"}


def test_weighted_sampler_with_flips_is_seeded(product):
    train, test = product["tiny_train"], product["small_test"]
    assert train.labels.sum() == N_LABELLED and len(train) == 8 + N_LABELLED
    params = ClassifierParams(imbalance="weighted_sampler", augment=True, seed=3,
                              **{**FAST, "epochs": 2})
    first = FineTunedClassifier(params).fit(train)
    second = FineTunedClassifier(params).fit(train)
    assert first.history == second.history
    assert all(np.isfinite(first.history["train_loss"]))
    assert len(first.history["train_accuracy"]) == 2
    np.testing.assert_array_equal(first.predict_proba(test), second.predict_proba(test))


def test_flips_only_mirror_images():
    images = torch.arange(4 * 3 * 5 * 5, dtype=torch.float32).reshape(4, 3, 5, 5)
    flipped = FineTunedClassifier._flip(images, torch.Generator().manual_seed(0))
    for original, out in zip(images, flipped):
        candidates = [original, original.flip(-1), original.flip(-2), original.flip(-1, -2)]
        assert any(torch.equal(out, c) for c in candidates)
    assert not torch.equal(flipped, images)  # with this seed at least one image flips


def test_class_weights_are_inverse_to_class_counts():
    labels = np.array([0] * 30 + [1] * 6)
    weights = class_weights(labels)
    np.testing.assert_allclose(weights, [36 / (2 * 30), 36 / (2 * 6)])   # 0.6, 3.0
    # Each class then carries the same total weight in the loss.
    assert weights[0] * 30 == pytest.approx(weights[1] * 6)
    np.testing.assert_allclose(class_weights(np.array([0, 1, 0, 1])), [1.0, 1.0])
    with pytest.raises(DefectflowError, match="every class"):
        class_weights(np.zeros(5, dtype=int))


def test_fit_without_defective_images_is_a_clear_error(product):
    with pytest.raises(DefectflowError, match="labelled defective images"):
        FineTunedClassifier(ClassifierParams(epochs=1)).fit(product["good_only"])


def test_classifier_params_reject_bad_values():
    assert FineTunedClassifier.needs_labelled_defects and FineTunedClassifier.name == "classifier"
    for bad in (dict(unfreeze="layer4"), dict(imbalance="oversample"), dict(backbone="vgg16"),
                dict(epochs=0), dict(lr=0), dict(gamma=1.5), dict(n_defective=0),
                dict(batch_size=0), dict(augment="yes"), dict(lr="fast")):
        with pytest.raises(ValueError):
            ClassifierParams(**bad)
    assert ClassifierParams(lr="5e-5").lr == 5e-5   # as YAML reads it
