"""NSK kernel, the two SVMs, study splits, EER threshold and saving."""

from __future__ import annotations

import numpy as np
import pytest

from ray_app.imaging.classifiers import (
    NSKSVM,
    DiscSVM,
    SplitConfig,
    TrainedClassifier,
    fit_and_calibrate,
    nsk_kernel,
    split_studies,
)


def test_nsk_equals_the_linear_kernel_of_mean_embeddings_on_a_toy_case():
    a = [np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[3.0, 1.0]])]
    b = [np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])]
    # By hand: mean over pairs of <x, y>; bag a0 x b0 = (1+2+0 + 2+0+6) / 6 = 11/6.
    expected = np.array([[11 / 6], [(4 + 6 + 3) / 3]])
    np.testing.assert_allclose(nsk_kernel(a, b), expected)
    means_a = np.stack([x.mean(axis=0) for x in a])
    means_b = np.stack([x.mean(axis=0) for x in b])
    np.testing.assert_allclose(nsk_kernel(a, b), means_a @ means_b.T)


def test_nsk_on_random_bags_of_different_sizes():
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 16)) for n in (1, 3, 5, 2)]
    means = np.stack([b.mean(axis=0) for b in bags])
    kernel = nsk_kernel(bags, bags)
    np.testing.assert_allclose(kernel, means @ means.T, atol=1e-12)
    np.testing.assert_allclose(kernel, kernel.T)
    with pytest.raises(ValueError, match="no disc"):
        nsk_kernel([np.zeros((0, 16))], bags)


def mil_bags(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Positive scans hold one disc shifted along feature 0 (multiple-instance labels)."""
    labels = rng.integers(0, 2, n)
    bags = []
    for y in labels:
        discs = rng.normal(size=(5, 8))
        if y:
            discs[rng.integers(5), 0] += 6.0
        bags.append(discs)
    return bags, labels


def test_nsk_svm_learns_scan_labels_from_one_abnormal_disc():
    rng = np.random.default_rng(1)
    train, y_train = mil_bags(120, rng)
    test, y_test = mil_bags(60, rng)
    model = NSKSVM().fit(train, y_train)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y_test, model.scores(test)) > 0.9


def test_calibrated_disc_classifier_round_trips_through_a_folder(tmp_path):
    rng = np.random.default_rng(2)
    parts = {}
    for name, n in (("train", 200), ("validation", 80), ("test", 80)):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 12)) + y[:, None] * np.linspace(0, 1.5, 12)
        parts[name] = (x, y)
    trained = fit_and_calibrate(DiscSVM(), parts, "stenosis", {"note": "toy"}, {"weights_id": "x"})
    assert trained.metrics["test"]["auroc"] > 0.9
    val_scores = trained.model.scores(parts["validation"][0])
    from ray_app.evaluation.thresholds import eer_threshold

    assert trained.threshold == eer_threshold(parts["validation"][1], val_scores)[0]
    assert trained.metrics["test"]["threshold"] == trained.threshold
    loaded = TrainedClassifier.load(trained.save(tmp_path / "clf"))
    scores, labels = loaded.predict(parts["test"][0])
    np.testing.assert_array_equal(scores, trained.model.scores(parts["test"][0]))
    np.testing.assert_array_equal(labels, scores >= trained.threshold)
    assert loaded.kind == "disc" and loaded.provenance["note"] == "toy"
    assert "code_version" in loaded.provenance and loaded.embedding_settings == {"weights_id": "x"}


def test_one_class_in_a_split_is_an_error_that_says_what_to_do():
    x = np.random.default_rng(3).normal(size=(10, 4))
    parts = {"train": (x, np.array([0, 1] * 5)), "validation": (x, np.zeros(10, int))}
    with pytest.raises(ValueError, match="validation split has only one class"):
        fit_and_calibrate(DiscSVM(), parts, "c", {}, {})


def test_study_splits_are_disjoint_stratified_and_seeded():
    labels = {f"s{i:02d}": int(i % 4 == 0) for i in range(40)}
    parts = split_studies(labels, SplitConfig(0.25, 0.25, seed=5))
    assert sorted(sum(parts.values(), [])) == sorted(labels)
    assert [len(parts[p]) for p in ("train", "validation", "test")] == [20, 10, 10]
    for ids in parts.values():
        assert 0 < sum(labels[s] for s in ids) < len(ids)
    assert split_studies(labels, SplitConfig(0.25, 0.25, seed=5)) == parts
    assert split_studies(labels, SplitConfig(0.25, 0.25, seed=6)) != parts
