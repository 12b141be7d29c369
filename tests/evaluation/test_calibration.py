"""EER thresholds and calibration files (ray_app/evaluation/calibration.py)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from ray_app.evaluation.calibration import (
    Calibration,
    CalibrationError,
    ThresholdEntry,
    band_thresholds,
    eer_threshold,
    threshold_entry,
)

# Worked ROC example. Negatives 0.1 0.3 0.35 0.8; positives 0.4 0.6 0.7 0.9.
# Descending: 0.9P 0.8N 0.7P 0.6P 0.4P 0.35N 0.3N 0.1N. At threshold t (predict score >= t):
#   t=0.9: TP1 FP0 -> FPR 0.00 FNR 0.75   t=0.8: TP1 FP1 -> FPR 0.25 FNR 0.75
#   t=0.7: TP2 FP1 -> FPR 0.25 FNR 0.50   t=0.6: TP3 FP1 -> FPR 0.25 FNR 0.25  <- equal
#   t=0.4: TP4 FP1 -> FPR 0.25 FNR 0.00   (lower thresholds only add false positives)
# So threshold 0.6, EER 0.25. AUROC = pairs ranked right / 16 = (3 + 3 + 3 + 4) / 16 = 0.8125.
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
SCORES = [0.1, 0.3, 0.35, 0.8, 0.4, 0.6, 0.7, 0.9]


def rates(labels, scores, threshold) -> tuple[float, float]:
    y, predicted = np.asarray(labels), np.asarray(scores) >= threshold
    fpr = float(np.mean(predicted[y == 0]))
    fnr = float(np.mean(~predicted[y == 1]))
    return fpr, fnr


def test_eer_on_worked_example():
    assert eer_threshold(LABELS, SCORES) == (0.6, 0.25)
    assert rates(LABELS, SCORES, 0.6) == (0.25, 0.25)


def test_eer_when_no_point_has_equal_rates():
    # Negatives 0.2 0.6; positives 0.4 0.7 0.9.  Descending: 0.9P 0.7P 0.6N 0.4P 0.2N.
    #   t=0.9: FPR 0 FNR 2/3 (gap 2/3)   t=0.7: FPR 0 FNR 1/3 (gap 1/3)
    #   t=0.6: FPR 1/2 FNR 1/3 (gap 1/6) <- closest   t=0.4: FPR 1/2 FNR 0 (gap 1/2)
    # EER = (1/2 + 1/3) / 2 = 5/12.
    labels, scores = [0, 0, 1, 1, 1], [0.2, 0.6, 0.4, 0.7, 0.9]
    threshold, eer = eer_threshold(labels, scores)
    assert threshold == 0.6 and eer == pytest.approx(5 / 12, abs=1e-15)
    assert rates(labels, scores, threshold) == pytest.approx((1 / 2, 1 / 3))


def test_threshold_keeps_full_precision_near_one():
    # Scores pile up near 1 (measured on real reports): the threshold must be the exact score, not rounded.
    scores = [0.9734512345678912, 0.9734512345678913, 0.97345, 0.99999999]
    labels = [0, 1, 0, 1]
    threshold, eer = eer_threshold(labels, scores)
    assert threshold == 0.9734512345678913 and eer == 0.0
    assert rates(labels, scores, threshold) == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_score_at_threshold_reproduces_the_closest_roc_point(seed):
    rng = random.Random(seed)
    labels = [rng.random() < 0.3 for _ in range(60)]
    labels[0], labels[1] = True, False
    # Rounded scores make ties; positives score higher on average.
    scores = [round(min(1.0, rng.random() * 0.7 + 0.3 * y), 1) for y in labels]
    threshold, eer = eer_threshold(labels, scores)
    fpr, fnr = rates(labels, scores, threshold)
    assert (fpr + fnr) / 2 == pytest.approx(eer, abs=1e-12)
    assert threshold in scores
    gaps = [abs(np.subtract(*rates(labels, scores, t))) for t in set(scores)]
    assert abs(fpr - fnr) == pytest.approx(min(gaps), abs=1e-12)


@pytest.mark.parametrize(
    "labels, scores",
    [([1, 1, 1], [0.2, 0.5, 0.9]), ([0, 0], [0.1, 0.2]), ([1], [0.5]), ([], [])],
)
def test_one_class_raises(labels, scores):
    with pytest.raises(CalibrationError, match=r"needs both positives and negatives"):
        eer_threshold(labels, scores)


def test_threshold_entry_fields():
    entry = threshold_entry("spinal_cancer", None, LABELS, SCORES, method="eer")
    base = ThresholdEntry("spinal_cancer", None, 0.6, 8, 4, 0.8125, 0.25)
    assert dataclasses.replace(entry, band_note=None, target_sensitivity=None,
                               target_specificity=None) == base


# --- Uncertainty band ---------------------------------------------------------------------------

# Worked band example. Negatives score 0..19, positives 3..22 (20 each).
# Sensitivity >= 0.95 allows one missed positive: the highest such threshold is 4 (misses 3).
# Specificity >= 0.95 allows one negative at or above the threshold: the lowest such threshold
# is 19 (only the negative 19 passes; at 18 two do).
BAND_LABELS = [0] * 20 + [1] * 20
BAND_SCORES = [float(i) for i in range(20)] + [float(i) for i in range(3, 23)]


def test_band_on_worked_example():
    entry = threshold_entry("fracture", None, BAND_LABELS, BAND_SCORES)
    assert (entry.band_low, entry.band_high) == (4.0, 19.0)
    assert entry.band_low <= entry.threshold <= entry.band_high
    assert entry.band_note is None
    assert [entry.is_uncertain(s) for s in (3.0, 4.0, 18.9, 19.0)] == [False, True, True, False]


def test_band_targets_are_met_and_tightest():
    y = np.asarray(BAND_LABELS)
    s = np.asarray(BAND_SCORES)
    low, high = band_thresholds(y, s, 11.0, 0.9, 0.9)

    def sensitivity(t):
        return 1 - rates(y, s, t)[1]

    def specificity(t):
        return 1 - rates(y, s, t)[0]

    assert (low, high) == (5.0, 18.0)
    assert sensitivity(low) >= 0.9 and sensitivity(low + 1) < 0.9
    assert specificity(high) >= 0.9 and specificity(high - 1) < 0.9


def test_band_of_a_separating_score_shrinks_to_the_eer_threshold():
    # Perfect separation: the sensitivity target is met above the specificity one, so the raw
    # band would be inside out (low 101 > high 19); it must collapse onto the EER threshold.
    labels = [0] * 20 + [1] * 20
    scores = [float(i) for i in range(20)] + [float(i) for i in range(100, 120)]
    entry = threshold_entry("pneumothorax", None, labels, scores)
    assert entry.band_low == entry.band_high == entry.threshold
    assert not any(entry.is_uncertain(s) for s in scores)


def test_band_needs_enough_of_each_class():
    entry = threshold_entry("fracture", None, [0] * 30 + [1] * 12, [0.1] * 30 + [0.9] * 12)
    assert entry.band_low is None and entry.is_uncertain(0.5) is None
    assert "needs at least 20 positives and 20 negatives" in entry.band_note
    assert "has 12 and 30" in entry.band_note
    lowered = threshold_entry("fracture", None, [0] * 30 + [1] * 12, [0.1] * 30 + [0.9] * 12,
                              target_sensitivity=0.9, target_specificity=0.9)
    assert lowered.band_note is None and lowered.band_low is not None


def test_band_target_out_of_range_is_refused():
    with pytest.raises(CalibrationError, match=r"target sensitivity 1.0 must be in"):
        band_thresholds(BAND_LABELS, BAND_SCORES, 10.0, 1.0, 0.95)


def test_version_1_file_loads_without_a_band(tmp_path):
    data = make_calibration().to_dict()
    data["format_version"] = 1
    for entry in data["entries"]:
        for key in ("band_low", "band_high", "target_sensitivity", "target_specificity",
                    "band_note"):
            entry.pop(key)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = Calibration.load(path)
    assert loaded.entry("fracture", None).threshold == 0.5
    assert loaded.entry("fracture", None).is_uncertain(0.5) is None


# --- Calibration files --------------------------------------------------------------------------


def make_calibration(**changes) -> Calibration:
    calibration = Calibration(
        model="qwen2.5-coder-1.5b-instruct",
        method="summary",
        prompt_hash="0123456789abcdef",
        definition_hashes={"spinal_canal_stenosis": "aaaabbbbccccdddd", "fracture": "ffff0000"},
        entries=(
            ThresholdEntry("spinal_canal_stenosis", None, 0.9734512345678912, 40, 12, 0.98, 0.05),
            ThresholdEntry("spinal_canal_stenosis", "L4-L5", 0.99, 40, 9, 0.97, 0.1),
            ThresholdEntry("fracture", None, 0.5, 30, 10, 0.9, 0.2),
        ),
        engine="transformers",
        created_at="2024-06-01T12:00:00+00:00",
        code_version="0.1.0+gabc",
    )
    return dataclasses.replace(calibration, **changes)


def test_save_load_round_trip_is_exact(tmp_path):
    calibration = make_calibration()
    path = tmp_path / "cal.json"
    calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded == calibration
    threshold = loaded.entry("spinal_canal_stenosis", None).threshold
    assert threshold == 0.9734512345678912 and threshold.hex() == (0.9734512345678912).hex()
    assert loaded.entry("spinal_canal_stenosis", "L4-L5").threshold == 0.99
    assert loaded.entry("spinal_canal_stenosis", "L5-S1") is None
    assert loaded.calibration_id == calibration.calibration_id
    assert json.loads(path.read_text())["calibration_id"] == calibration.calibration_id


def test_calibration_id_changes_with_one_ulp_of_threshold():
    calibration = make_calibration()
    first, *rest = calibration.entries
    nudged = dataclasses.replace(first, threshold=float(np.nextafter(first.threshold, 1.0)))
    other = make_calibration(entries=(nudged, *rest))
    assert other.calibration_id != calibration.calibration_id
    assert calibration.calibration_id == make_calibration().calibration_id
    assert calibration.calibration_id.startswith("cal-") and len(calibration.calibration_id) == 16


def test_new_calibration_stamps_time_and_code_version():
    calibration = Calibration("m", "direct", "p", {}, ())
    assert calibration.created_at[:2] == "20" and calibration.created_at.endswith("+00:00")
    assert calibration.code_version.startswith("0.")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"cannot read calibration file"),
        ('{"model": "m"}', r"not a ray_app calibration"),
        ('{"format_version": 99, "model": "m"}', r"not a ray_app calibration"),
    ],
)
def test_load_refuses_bad_files(tmp_path, content, message):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        Calibration.load(path)


@pytest.mark.parametrize(
    "content", ['{"format_version": 1, "model": "m"}', '{"format_version": 1, "entries": []}']
)
def test_load_incomplete_file_raises_calibration_error(tmp_path, content):
    path = tmp_path / "cal.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=r"cal\.json"):
        Calibration.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match=r"cannot read calibration file .*missing\.json"):
        Calibration.load(tmp_path / "missing.json")


# --- check_applies ------------------------------------------------------------------------------

MATCHING = dict(
    model="qwen2.5-coder-1.5b-instruct",
    prompt_hash="0123456789abcdef",
    condition="spinal_canal_stenosis",
    definition_hash="aaaabbbbccccdddd",
)


def test_check_applies_accepts_the_same_setup():
    assert make_calibration().check_applies(**MATCHING) is None
    make_calibration().check_applies(**{**MATCHING, "condition": "fracture",
                                        "definition_hash": "ffff0000"})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "smollm2-135m-instruct"},
         r"model 'smollm2-135m-instruct' \(calibrated: 'qwen2.5-coder-1.5b-instruct'\)"),
        ({"prompt_hash": "fedcba9876543210"},
         r"prompt hash fedcba9876543210 \(calibrated: 0123456789abcdef\)"),
        ({"definition_hash": "0000000000000000"},
         r"definition of 'spinal_canal_stenosis' changed since calibration"),
        ({"condition": "pneumothorax"}, r"condition 'pneumothorax' \(not in this calibration\)"),
    ],
    ids=["model", "prompt", "definition", "unknown-condition"],
)
def test_check_applies_refuses_each_mismatch(change, message):
    calibration = make_calibration()
    with pytest.raises(CalibrationError, match=message) as info:
        calibration.check_applies(**{**MATCHING, **change})
    assert calibration.calibration_id in str(info.value)
    assert "Recalibrate" in str(info.value)


def test_check_applies_names_every_mismatch_at_once():
    with pytest.raises(CalibrationError) as info:
        make_calibration().check_applies("other-model", "ffff", "spinal_canal_stenosis", "x")
    text = str(info.value)
    assert "model 'other-model'" in text and "prompt hash ffff" in text
    assert "definition of 'spinal_canal_stenosis' changed" in text
