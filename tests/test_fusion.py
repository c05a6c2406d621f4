"""SegAD fusion on synthetic numbers: segments, features, classifier settings, protocol, defects."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.stats import kurtosis, skew

from defectflow.tasks.errors import DefectflowError
from defectflow.tasks.fusion import (
    DEFECT_KINDS,
    ChoiceSettings,
    FusionSplit,
    assert_no_leakage,
    count_segments,
    feature_frame,
    feature_matrix,
    feature_names,
    fit_and_score,
    grid_segments,
    make_classifier,
    mask_segments,
    one_class_split,
    run_protocol,
    score_columns,
    score_frame,
    segment_features,
    superpixel_segments,
    supervised_splits,
    synthesize_defects,
)


def _expected_stats(values: np.ndarray) -> list[float]:
    """The four statistics by their definitions (numpy/scipy), 0 where scipy has no answer."""
    if values.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    values = values.astype(np.float64)
    if np.ptp(values) == 0:
        return [float(values[0]), 0.0, 0.0, float(values[0])]
    return [float(np.quantile(values, 0.995)), float(skew(values)), float(kurtosis(values)),
            float(values.mean())]


def _quadrant_image(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    half = size // 2
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for (r, c), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], colours):
        image[r * half:(r + 1) * half, c * half:(c + 1) * half] = colour
    noise = rng.integers(-5, 6, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ segments


@pytest.mark.parametrize("k, cells", [(1, 1), (4, 4), (6, 6), (7, 8), (16, 16), (64, 64)])
def test_grid_segments_cover_the_map_with_consecutive_ids(k, cells):
    segments = grid_segments(20, k)
    assert segments.shape == (20, 20) and segments.dtype == np.int32
    assert np.array_equal(np.unique(segments), np.arange(cells))
    assert count_segments(segments) == cells


def test_grid_segments_are_near_square_blocks():
    segments = grid_segments(16, 16)
    assert np.array_equal(segments[::4, ::4], np.arange(16).reshape(4, 4))
    assert np.array_equal(np.bincount(segments.ravel()), np.full(16, 16))
    # More cells than pixels on a side: no empty cell.
    assert np.array_equal(np.unique(grid_segments(3, 16)), np.arange(9))
    with pytest.raises(DefectflowError):
        grid_segments(16, 0)


@pytest.mark.parametrize("method", ["slic", "kmeans"])
def test_superpixel_segments_follow_the_reference_image(method):
    image = _quadrant_image()
    segments = superpixel_segments(image, k=4, size=32, seed=0, method=method)
    assert segments.shape == (32, 32) and segments.dtype == np.int32
    assert np.array_equal(np.unique(segments), np.arange(count_segments(segments)))
    # Each colour quadrant is (almost entirely) one segment, a different one per quadrant.
    majors = []
    for r in (0, 16):
        for c in (0, 16):
            quadrant = segments[r:r + 16, c:c + 16]
            values, counts = np.unique(quadrant, return_counts=True)
            assert counts.max() >= 0.9 * quadrant.size
            majors.append(values[counts.argmax()])
    assert len(set(majors)) == 4
    again = superpixel_segments(image, k=4, size=32, seed=0, method=method)
    assert np.array_equal(segments, again)


def test_superpixel_segments_accept_grey_images_and_name_bad_input():
    grey = _quadrant_image()[..., 0]
    segments = superpixel_segments(grey, k=9, size=24)
    assert segments.shape == (24, 24)
    assert np.array_equal(np.unique(segments), np.arange(count_segments(segments)))
    with pytest.raises(DefectflowError, match="unknown superpixel method"):
        superpixel_segments(grey, k=4, size=24, method="watershed")
    with pytest.raises(DefectflowError, match="dtype"):
        superpixel_segments(grey.astype(np.float32), k=4, size=24)


def test_mask_segments_read_arrays_and_files(tmp_path):
    labels = np.zeros((40, 60), np.uint16)
    labels[:, 30:] = 2
    labels[:10, :10] = 300  # 16-bit ids survive
    png = tmp_path / "parts.png"
    cv2.imwrite(str(png), labels)
    npy = tmp_path / "parts.npy"
    np.save(npy, np.ones((8, 8), np.int64))
    rgb_grey = np.repeat(np.eye(4, dtype=np.uint8)[:, :, None], 3, axis=2)

    segments = mask_segments([labels, str(png), npy, rgb_grey], size=20)
    assert segments.shape == (4, 20, 20) and segments.dtype == np.int32
    assert np.array_equal(segments[0], segments[1])
    assert segments[0, 0, 0] == 300 and segments[0, 19, 0] == 0 and segments[0, 0, 19] == 2
    assert (segments[2] == 1).all()
    assert set(np.unique(segments[3])) == {0, 1}
    assert count_segments(segments) == 301


def test_mask_segments_name_bad_masks(tmp_path):
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    with pytest.raises(DefectflowError, match="colour channels"):
        mask_segments([colour], 8)
    with pytest.raises(DefectflowError, match="negative"):
        mask_segments([np.full((4, 4), -1)], 8)
    with pytest.raises(DefectflowError, match="non-integer"):
        mask_segments([np.full((4, 4), 0.5)], 8)
    with pytest.raises(DefectflowError, match="not found") as error:
        mask_segments([tmp_path / "missing.png"], 8)
    assert "missing.png" in str(error.value)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DefectflowError, match="decode"):
        mask_segments([tmp_path / "broken.png"], 8)


# ------------------------------------------------------------------------------ features


def test_segment_features_known_values_and_order():
    segments = np.zeros((4, 4), np.int32)
    segments[:, 2:] = 1                       # segment 2 of k=3 is empty
    constant = np.full((4, 4), 0.5, np.float32)
    constant[:, 2:] = [[0, 1], [0, 0], [0, 0], [0, 0]]
    noise = np.random.default_rng(0).random((4, 4)).astype(np.float32)

    vector = segment_features([constant, noise], segments, k=3)
    assert vector.dtype == np.float32 and vector.shape == (3 * 2 * 4 + 2,)
    # Detector 0, segment 0: constant 0.5 -> q995 = mean = 0.5, skew = kurt = 0 (not NaN).
    assert np.array_equal(vector[0:4], [0.5, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(vector[4:8], _expected_stats(constant[:, 2:].ravel()), rtol=1e-5)
    assert np.array_equal(vector[8:12], np.zeros(4))           # empty segment
    np.testing.assert_allclose(vector[12:16], _expected_stats(noise[:, :2].ravel()), rtol=1e-5)
    np.testing.assert_allclose(vector[16:20], _expected_stats(noise[:, 2:].ravel()), rtol=1e-5)
    assert np.array_equal(vector[20:24], np.zeros(4))
    np.testing.assert_allclose(vector[24:], [1.0, noise.max()])  # image scores = map maxima
    names = feature_names(3, ["a", "b"])
    assert names[:5] == ["a.seg0.q995", "a.seg0.skew", "a.seg0.kurt", "a.seg0.mean", "a.seg1.q995"]
    assert names[12] == "b.seg0.q995" and names[-2:] == ["a.image_score", "b.image_score"]
    assert len(names) == len(vector)


def test_feature_matrix_matches_definitions_for_shared_and_per_image_segments():
    rng = np.random.default_rng(1)
    n, size, k = 6, 24, 5
    maps = [rng.gamma(2.0, size=(n, size, size)).astype(np.float16) for _ in range(3)]
    shared = rng.integers(0, k - 1, size=(size, size)).astype(np.int32)  # id 4 never used
    per_image = rng.integers(0, k, size=(n, size, size)).astype(np.int32)

    from_shared = feature_matrix(maps, shared, k=k)
    assert from_shared.shape == (n, k * 3 * 4 + 3)
    same_for_all = feature_matrix(maps, np.repeat(shared[None], n, axis=0), k=k)
    np.testing.assert_array_equal(from_shared, same_for_all)

    from_masks = feature_matrix(maps, per_image, k=k)
    for i in range(n):
        expected = []
        for m in range(3):
            values = maps[m][i].astype(np.float32)
            for s in range(k):
                expected += _expected_stats(values[per_image[i] == s])
        expected += [float(m[i].max()) for m in maps]
        np.testing.assert_allclose(from_masks[i], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(
            from_masks[i], segment_features([m[i] for m in maps], per_image[i], k))


def test_feature_frame_and_bad_feature_input():
    rng = np.random.default_rng(2)
    maps = [rng.random((3, 8, 8)).astype(np.float32) for _ in range(2)]
    segments = grid_segments(8, 4)
    scores = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0, 6.0])]
    frame = feature_frame(maps, segments, ["x", "y", "z"], ["pc", "padim"], image_scores=scores)
    assert list(frame.index) == ["x", "y", "z"] and frame.index.name == "image_id"
    assert list(frame.columns) == feature_names(4, ["pc", "padim"])
    assert frame.loc["y", "padim.image_score"] == 5.0

    with pytest.raises(DefectflowError, match="shape"):
        feature_matrix([maps[0], maps[1][:, :4, :4]], segments)
    with pytest.raises(DefectflowError, match="segments have shape"):
        feature_matrix(maps, grid_segments(6, 4))
    with pytest.raises(DefectflowError, match="segment ids"):
        feature_matrix(maps, segments, k=2)
    broken = maps[1].copy()
    broken[1, 2, 3] = np.nan
    with pytest.raises(DefectflowError, match="detector #1 contain NaN"):
        feature_matrix([maps[0], broken], segments)


# ---------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("kind, rounds, trees, eta, colsample_bytree", [
    ("brf", 10, 200, 0.3, 0.6),
    ("rf", 1, 2000, 1.0, 0.6),
    ("bt", 2000, 1, 0.3, 1.0),
])
def test_classifier_settings_are_segad_appendix_a1(kind, rounds, trees, eta, colsample_bytree):
    model = make_classifier(kind, scale_pos_weight=4.0, seed=7)
    params = model.get_xgb_params()
    assert params["objective"] == "binary:logitraw"
    assert model.n_estimators == rounds and params["num_parallel_tree"] == trees
    assert params["learning_rate"] == eta and params["max_depth"] == 5
    assert params["subsample"] == 0.6 and params["colsample_bynode"] == 0.6
    assert params["colsample_bytree"] == (None if kind == "bt" else 0.6)
    assert params["reg_alpha"] == 1 and params["scale_pos_weight"] == 4.0
    assert params["n_jobs"] == 2 and params["random_state"] == 7
    assert params["tree_method"] == "hist"

    rng = np.random.default_rng(0)
    features = rng.normal(size=(24, 3)).astype(np.float32)
    labels = np.r_[np.ones(6), np.zeros(18)].astype(int)
    model.set_params(n_jobs=1)  # the fit's speed only: shared CPUs make 2 threads spin
    model.fit(features, labels)
    learner = json.loads(model.get_booster().save_config())["learner"]
    tree = learner["gradient_booster"]["tree_train_param"]
    assert learner["gradient_booster"]["gbtree_model_param"]["num_parallel_tree"] == str(trees)
    assert float(tree["eta"]) == pytest.approx(eta)
    assert tree["max_depth"] == "5" and float(tree["alpha"]) == 1.0
    assert float(tree["subsample"]) == pytest.approx(0.6)
    assert float(tree["colsample_bynode"]) == pytest.approx(0.6)
    assert float(tree["colsample_bytree"]) == pytest.approx(colsample_bytree)
    assert learner["objective"]["name"] == "binary:logitraw"
    assert float(learner["objective"]["reg_loss_param"]["scale_pos_weight"]) == 4.0
    assert model.get_booster().num_boosted_rounds() == rounds


def test_unknown_classifier_kind_is_an_error():
    with pytest.raises(DefectflowError, match="unknown fusion classifier"):
        make_classifier("svm")


# ------------------------------------------------------------------------------ protocol


def _manifest(n_train=30, n_val=12, n_test_good=15, n_test_bad=16):
    ids, labels, splits = [], [], []
    for prefix, count, label, split in [("tr", n_train, 0, "train"), ("va", n_val, 0, "val"),
                                        ("tg", n_test_good, 0, "test"),
                                        ("tb", n_test_bad, 1, "test")]:
        ids += [f"{prefix}{i:03d}" for i in range(count)]
        labels += [label] * count
        splits += [split] * count
    return ids, labels, splits


def test_supervised_splits_never_evaluate_training_images():
    ids, labels, splits = _manifest(n_test_bad=16)
    by_split = pd.Series(splits, index=ids)
    val = set(by_split.index[by_split == "val"])
    test = set(by_split.index[by_split == "test"])
    result = supervised_splits(ids, labels, splits, n_defective=20, seeds=range(10))
    assert [s.seed for s in result] == list(range(10))
    assert_no_leakage(result)
    draws = set()
    for split in result:
        train, evaluation = set(split.train_ids), set(split.eval_ids)
        assert not train & evaluation
        goods = {i for i in train if labels[ids.index(i)] == 0}
        assert goods == val                      # every val image, and only val images
        bads = train - goods
        assert len(bads) == 8                    # 20 asked, half of the 16 defective tests
        assert bads <= test and evaluation == test - bads
        assert not any(by_split[i] == "train" for i in train | evaluation)
        draws.add(tuple(sorted(bads)))
    assert len(draws) > 1                        # seeds draw different defects
    again = supervised_splits(list(reversed(ids)), list(reversed(labels)),
                              list(reversed(splits)), n_defective=20, seeds=range(10))
    assert again == result                       # independent of the input order


def test_supervised_splits_name_impossible_protocols():
    ids, labels, splits = _manifest(n_test_bad=1)
    with pytest.raises(DefectflowError, match="at least 2 defective"):
        supervised_splits(ids, labels, splits)
    ids, labels, splits = _manifest(n_val=0)
    with pytest.raises(DefectflowError, match="val"):
        supervised_splits(ids, labels, splits)
    ids, labels, splits = _manifest()
    labels[ids.index("va000")] = 1
    with pytest.raises(DefectflowError, match="must be good"):
        supervised_splits(ids, labels, splits)


def test_assert_no_leakage_catches_an_evaluated_training_image():
    leaky = FusionSplit(train_ids=("a", "b"), eval_ids=("b", "c"), seed=3)
    with pytest.raises(DefectflowError, match="seed 3"):
        assert_no_leakage([FusionSplit(("a",), ("c",), 0), leaky])


def _segment_informative_maps(n: int, bad: np.ndarray, rng: np.random.Generator):
    """Detector 0 has false alarms in segment 0 of any image and a weaker peak in segment 3
    of defective ones; detector 1 is noise. The map maximum is then a poor image score."""
    size = 16
    det0 = rng.random((n, size, size)).astype(np.float32) * 0.2
    det1 = rng.random((n, size, size)).astype(np.float32) * 0.2
    alarms = rng.random(n) < 0.5
    for i in np.flatnonzero(alarms):
        y, x = rng.integers(1, 7, size=2)
        det0[i, y - 1:y + 2, x - 1:x + 2] += rng.uniform(0.9, 1.5)
    for i in np.flatnonzero(bad):
        y, x = rng.integers(9, 15, size=2)
        det0[i, y - 1:y + 2, x - 1:x + 2] += rng.uniform(0.5, 0.8)
    return [det0, det1], grid_segments(size, 4)


def test_fusion_beats_the_image_score_where_a_segment_carries_the_signal():
    ids, labels, splits = _manifest(n_train=0, n_val=60, n_test_good=60, n_test_bad=40)
    labels = np.asarray(labels)
    maps, segments = _segment_informative_maps(len(ids), labels == 1, np.random.default_rng(3))
    features = feature_frame(maps, segments, ids, ["noisy", "blind"])
    label_of = pd.Series(labels, index=ids)
    fusion_splits = supervised_splits(ids, labels, splits, n_defective=20, seeds=range(3))

    result = run_protocol(features, label_of, fusion_splits, kind="brf",
                          baselines=["noisy.image_score"], n_jobs=1)
    per_seed = result.per_seed
    assert list(per_seed.columns[:6]) == ["seed", "image_auroc", "image_aupr", "n_train_good",
                                          "n_train_bad", "n_eval"]
    assert per_seed["n_train_good"].eq(60).all() and per_seed["n_train_bad"].eq(20).all()
    assert per_seed["n_eval"].eq(80).all()
    summary = result.summary
    assert summary["image_auroc_mean"] > 0.95
    assert summary["image_auroc_mean"] > summary["noisy.image_score_auroc_mean"] + 0.15
    assert summary["image_aupr_mean"] > summary["noisy.image_score_aupr_mean"]
    assert np.isfinite(summary["image_auroc_std"])
    # Scores are given for each seed's evaluation images only.
    for split in fusion_splits:
        seed_scores = result.scores[result.scores["seed"] == split.seed]
        assert list(seed_scores["image_id"]) == list(split.eval_ids)
        assert not set(seed_scores["image_id"]) & set(split.train_ids)

    leaky = FusionSplit(fusion_splits[0].train_ids, fusion_splits[0].train_ids[:3], seed=0)
    with pytest.raises(DefectflowError, match="trained on"):
        run_protocol(features, label_of, [leaky])
    with pytest.raises(DefectflowError, match="lacks"):
        fit_and_score(features.drop(index=fusion_splits[0].eval_ids[0]), label_of,
                      fusion_splits[0])


def test_one_class_split_trains_on_val_and_synthetic_and_evaluates_all_tests():
    ids, labels, splits = _manifest(n_train=3, n_val=4, n_test_good=2, n_test_bad=2)
    split = one_class_split(ids, splits, ["syn/va000/0", "syn/va001/0"], seed=5)
    assert set(split.train_ids) == {f"va{i:03d}" for i in range(4)} | {"syn/va000/0",
                                                                       "syn/va001/0"}
    assert set(split.eval_ids) == {"tg000", "tg001", "tb000", "tb001"} and split.seed == 5
    with pytest.raises(DefectflowError, match="synthetic"):
        one_class_split(ids, splits, [])


# -------------------------------------------------------------------- one-class defects


def _textured(rng: np.random.Generator, size: int = 64, grey: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    base = 120 + 50 * np.sin(xx / 2.0) * np.cos(yy / 3.0) + rng.normal(0, 8, (size, size))
    image = np.clip(base, 0, 255).astype(np.uint8)
    if grey:
        return image
    return np.stack([image, np.roll(image, 5, axis=1), 255 - image], axis=2)


@pytest.mark.parametrize("kind", DEFECT_KINDS + (None,))
@pytest.mark.parametrize("grey", [False, True])
def test_synthetic_defects_change_only_pixels_in_a_non_empty_mask(kind, grey):
    rng = np.random.default_rng(11)
    segments = grid_segments(32, 4)   # half the image's resolution: resized inside
    for _ in range(5):
        image = _textured(rng, grey=grey)
        defect, mask = synthesize_defects(image, segments, rng, kind=kind)
        assert defect.shape == image.shape and defect.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool and mask.any()
        changed = defect != image if grey else (defect != image).any(axis=2)
        assert not (changed & ~mask).any()
        assert changed[mask].any()
        if kind == "blur":  # blurred inside one segment only
            full = cv2.resize(segments, (64, 64), interpolation=cv2.INTER_NEAREST)
            assert len(np.unique(full[mask])) == 1
        if kind == "line":  # 1-3 px wide: thin compared with its length
            assert mask.sum() <= (0.3 * 64 + 2) * 4


def test_synthetic_defects_on_flat_images_stay_visible_and_grey():
    rng = np.random.default_rng(0)
    flat = np.full((48, 48, 3), 128, np.uint8)
    defect, mask = synthesize_defects(flat, grid_segments(48, 4), rng, kind="blur")
    assert mask.any() and (defect != flat).any(axis=2)[mask].all()   # fell back to a rectangle
    assert (defect == defect[..., :1]).all()                         # grey stays grey
    with pytest.raises(DefectflowError, match="unknown synthetic defect"):
        synthesize_defects(flat, grid_segments(48, 4), rng, kind="scratch")


def _one_informative_detector(n: int, bad: np.ndarray, rng: np.random.Generator):
    """Detector "informative" scores defects higher (AUROC about 0.8) and peaks where it
    scores; three others are pure noise, maps and scores, on scales from 0.1 to 100."""
    size = 16
    score = rng.normal(size=n) + 1.2 * bad
    informative = rng.random((n, size, size)).astype(np.float32)
    for i in range(n):
        y, x = rng.integers(1, size - 1, size=2)
        informative[i, y - 1:y + 2, x - 1:x + 2] += max(score[i], 0.0)
    maps, scores = [informative], [score]
    for scale in (0.1, 3.0, 100.0):
        maps.append(rng.random((n, size, size)).astype(np.float32) * scale)
        scores.append(rng.normal(size=n) * scale)
    return maps, scores, grid_segments(size, 4)


def test_auto_fusion_among_pure_noise_scores_at_least_as_well_as_the_one_real_detector():
    ids, labels, splits = _manifest(n_train=0, n_val=60, n_test_good=60, n_test_bad=40)
    labels = np.asarray(labels)
    detectors = ["informative", "noise_a", "noise_b", "noise_c"]
    maps, scores, segments = _one_informative_detector(len(ids), labels == 1,
                                                       np.random.default_rng(0))
    frame = feature_frame(maps, segments, ids, detectors).join(
        score_frame(scores, ids, detectors))
    own = score_columns(detectors)
    label_of = pd.Series(labels, index=ids)
    fusion_splits = supervised_splits(ids, labels, splits, n_defective=20, seeds=range(3))

    def run(setting):
        choice = ChoiceSettings(tuple(zip(detectors, own)),
                                tuple(c for c in frame.columns
                                      if setting == "auto" or c not in own))
        return run_protocol(frame, label_of, fusion_splits, baselines=own, n_jobs=1,
                            setting=setting, choice=choice)

    auto, paper = run("auto"), run("paper")
    alone = auto.summary["informative.score_auroc_mean"]
    assert auto.summary["image_auroc_mean"] >= alone
    # The noise swamps SegAD's forest trained on 20 defects: what the auto setting avoids.
    assert paper.summary["image_auroc_mean"] < alone - 0.03
    assert paper.summary["informative.score_auroc_mean"] == alone  # the same images
    assert set(auto.per_seed["choice"]) <= {"informative", "stacker", "forest"}
    assert auto.per_seed["choice_reason"].str.contains("CV AUROC").all()
    # The choice used the training split only: the same on any evaluation labels.
    scrambled = label_of.copy()
    evaluated = list(fusion_splits[0].eval_ids)
    scrambled.loc[evaluated] = np.random.default_rng(1).permutation(
        scrambled.loc[evaluated].to_numpy())
    again = run_protocol(frame, scrambled, fusion_splits[:1], baselines=own, n_jobs=1,
                         setting="auto", choice=ChoiceSettings(tuple(zip(detectors, own)),
                                                               tuple(frame.columns)))
    assert again.per_seed["choice"].iloc[0] == auto.per_seed["choice"].iloc[0]
    assert np.array_equal(again.scores["score"], auto.scores[auto.scores["seed"] == 0]["score"])


def test_auto_fusion_keeps_the_forest_where_a_segment_carries_the_signal():
    ids, labels, splits = _manifest(n_train=0, n_val=60, n_test_good=60, n_test_bad=40)
    labels = np.asarray(labels)
    maps, segments = _segment_informative_maps(len(ids), labels == 1, np.random.default_rng(3))
    detectors = ["noisy", "blind"]
    frame = feature_frame(maps, segments, ids, detectors).join(
        score_frame([m.max(axis=(1, 2)) for m in maps], ids, detectors))
    own = score_columns(detectors)
    result = run_protocol(frame, pd.Series(labels, index=ids),
                          supervised_splits(ids, labels, splits, n_defective=20, seeds=range(2)),
                          baselines=own, n_jobs=1, setting="auto",
                          choice=ChoiceSettings(tuple(zip(detectors, own)), tuple(frame.columns)))
    assert (result.per_seed["choice"] == "forest").all()
    assert result.summary["image_auroc_mean"] > result.summary["noisy.score_auroc_mean"] + 0.15


@pytest.mark.parametrize("chosen", ["stacker", "informative"])
def test_served_fusion_scores_as_the_protocol_fitted_it(chosen, tmp_path):
    # The auto setting may serve the stacker or one detector: fusion.json alone must give
    # the scores the protocol's fitted fusion gave.
    from defectflow.tasks.fusion import FittedFusion, Choice, fit_stacker
    from defectflow.tasks.fusion.deploy import (FUSION_CONFIG_NAME, FusionConfig,
                                                write_deployable_fusion)

    ids, labels, _ = _manifest(n_train=0, n_val=20, n_test_good=10, n_test_bad=10)
    labels = pd.Series(labels, index=ids)
    detectors = ["informative", "noise_a", "noise_b", "noise_c"]
    maps, scores, segments = _one_informative_detector(len(ids), labels.to_numpy() == 1,
                                                       np.random.default_rng(4))
    frame = feature_frame(maps, segments, ids, detectors).join(
        score_frame(scores, ids, detectors))
    train = ids[:20] + ids[-5:]
    if chosen == "stacker":
        fitted = FittedFusion(Choice("stacker", reason="test"), stacker=fit_stacker(
            frame.loc[train], labels.loc[train].to_numpy(), score_columns(detectors)))
    else:
        fitted = FittedFusion(Choice(chosen, reason="test"),
                              score_column=score_columns([chosen])[0])
    write_deployable_fusion(tmp_path, fitted, frame, labels, train, 0, maps, ids, segments,
                            detectors, "product")
    config = FusionConfig.load(tmp_path / FUSION_CONFIG_NAME)
    assert config.model == chosen and not (tmp_path / "forest.json").exists()
    np.testing.assert_allclose(config.fitted().score(frame), fitted.score(frame))
    if chosen != "stacker":  # the detectors' own rule: a quantile of the training goods
        assert config.threshold == pytest.approx(
            np.quantile(frame.loc[ids[:20], "informative.score"], 0.99))
