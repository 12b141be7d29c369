"""Threshold methods (ray_app/evaluation/calibration.py: fit_threshold, THRESHOLD_METHODS) and
how a calibration records the one it used."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit
from sklearn.metrics import roc_curve

from ray_app.evaluation.calibration import (
    THRESHOLD_METHODS,
    Calibration,
    CalibrationError,
    build_calibration,
    describe,
    threshold_entry,
)
from ray_app.evaluation.thresholds import (
    DEFAULT_THRESHOLD_METHOD,
    LOGIT_CLIP,
    eer_threshold,
    fit_threshold,
    log_odds,
    method_params,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_calibration import make_calibration  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import calibrate as calibrate_job  # noqa: E402

# Mirror-image classes on the log-odds scale: negatives -2 -1 0, positives 2 3 4 (about 1).
# Every symmetric estimate of the equal-error point lands on z = 1, the empirical one on the
# lowest positive (z = 2: no error on the calibration set), and halfway down from it to the
# highest negative is z = 1 again.
MIRROR_Y = np.array([0, 0, 0, 1, 1, 1])
MIRROR_S = expit(np.array([-2.0, -1.0, 0.0, 2.0, 3.0, 4.0]))


@pytest.mark.parametrize("method, z", [
    ("eer", 2.0), ("youden", 2.0), ("bootstrap_eer", 2.0), ("eer_midpoint", 1.0),
    ("eer_smoothed", 1.0), ("eer_binormal", 1.0),
])
def test_mirror_image_classes(method, z):
    threshold = fit_threshold(MIRROR_Y, MIRROR_S, method)
    assert logit(threshold) == pytest.approx(z, abs=1e-8)
    if not THRESHOLD_METHODS[method].on_log_odds:  # a calibration score itself, bit for bit
        assert threshold in MIRROR_S


def test_binormal_is_the_closed_form_on_log_odds():
    # Negatives z = -1, 0, 1 (mean 0, sd 1); positives z = 3, 5 (mean 4, sd sqrt 2). The two
    # normals' error rates meet where (t - 4) / sqrt2 = (0 - t) / 1: t = 4 / (1 + sqrt2).
    y = [0, 0, 0, 1, 1]
    scores = expit(np.array([-1.0, 0.0, 1.0, 3.0, 5.0]))
    t = fit_threshold(y, scores, "eer_binormal")
    assert logit(t) == pytest.approx(4 / (1 + np.sqrt(2)), abs=1e-9)


def test_smoothed_threshold_balances_the_smoothed_error_rates():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(60), np.ones(6)].astype(int)
    z = np.r_[rng.normal(1.5, 1.0, 60), rng.normal(6.0, 1.5, 6)]
    t = logit(fit_threshold(y, expit(z), "eer_smoothed"))
    # F0 and F1 re-derived here: Gaussian kernels, Silverman's bandwidth per class.
    from scipy.stats import norm

    def cdf(values, at):
        spread = min(np.std(values, ddof=1),
                     np.subtract(*np.percentile(values, [75, 25])) / 1.349)
        width = 0.9 * spread * len(values) ** -0.2
        return norm.cdf((at - values) / width).mean()

    false_positive_rate, false_negative_rate = 1 - cdf(z[y == 0], t), cdf(z[y == 1], t)
    assert false_positive_rate == pytest.approx(false_negative_rate, abs=1e-8)
    assert z[y == 0].mean() < t < z[y == 1].mean()


def test_empirical_methods_are_the_roc_points():
    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.3).astype(int)
    s = np.round(rng.random(80) * 0.6 + 0.4 * y, 2)  # ties
    assert fit_threshold(y, s, "eer") == eer_threshold(y, s)[0]
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    assert fit_threshold(y, s, "youden") == thresholds[np.argmax(tpr - fpr)]


@pytest.mark.parametrize("seed", range(20))
def test_eer_threshold_matches_scikit_learn_roc(seed):
    """eer_threshold's own ROC points (fast enough for the bootstrap) pick the same point as
    scikit-learn's roc_curve, ties and all."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 90))
    y = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(int)
    y[0], y[-1] = 0, 1
    s = np.round(rng.random(n) * 0.6 + 0.4 * y, int(rng.integers(1, 4)))
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    fnr = 1.0 - tpr
    gaps = np.where(np.isfinite(thresholds), np.abs(fpr - fnr), np.inf)
    best = int(np.argmin(gaps))
    assert eer_threshold(y, s) == (thresholds[best], (fpr[best] + fnr[best]) / 2)


@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_scores_of_exactly_one_stay_finite(method):
    """Scores that saturate at 1.0 (and 0.0) are clipped on the log-odds scale, not inf."""
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.0, 0.6, 0.7, 0.95, 0.99999999, 1.0, 1.0, 1.0]
    threshold = fit_threshold(y, s, method)
    assert 0.0 < threshold <= 1.0 and np.isfinite(threshold)
    assert np.isfinite(log_odds(s)).all() and log_odds([1.0])[0] == logit(1 - LOGIT_CLIP)


@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_margins_that_are_not_probabilities_use_their_own_scale(method):
    y = [0] * 20 + [1] * 20
    s = [float(i) for i in range(20)] + [float(i) for i in range(3, 23)]
    threshold = fit_threshold(y, s, method)
    assert 3.0 <= threshold <= 19.0


def test_bootstrap_is_seeded_and_takes_its_parameters():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(50), np.ones(5)].astype(int)
    s = expit(np.r_[rng.normal(1.5, 1, 50), rng.normal(4, 1.5, 5)])
    first = fit_threshold(y, s, "bootstrap_eer")
    assert fit_threshold(y, s, "bootstrap_eer") == first and first in s
    assert fit_threshold(y, s, "bootstrap_eer", {"resamples": 51, "seed": 7}) in s


@pytest.mark.parametrize("method, params, message", [
    ("median", None, r"unknown threshold method 'median'; choose one of \["),
    ("bootstrap_eer", {"draws": 5}, r"takes no parameter\(s\) \['draws'\]"),
    ("eer", {"seed": 1}, r"its parameters: none"),
])
def test_bad_method_or_parameter_is_refused(method, params, message):
    with pytest.raises(CalibrationError, match=message):
        fit_threshold([0, 1], [0.2, 0.8], method, params)


@pytest.mark.parametrize("method", list(THRESHOLD_METHODS))
def test_one_class_is_refused_by_every_method(method):
    with pytest.raises(CalibrationError, match=r"needs both positives and negatives"):
        fit_threshold([1, 1, 1], [0.2, 0.5, 0.9], method)


def test_entry_keeps_the_empirical_eer_and_a_band_around_any_threshold():
    y = [0] * 20 + [1] * 20
    s = [i / 40 for i in range(20)] + [i / 40 for i in range(3, 23)]
    for method in THRESHOLD_METHODS:
        entry = threshold_entry("fracture", None, y, s, method=method)
        assert entry.eer == eer_threshold(y, s)[1]
        assert entry.band_low <= entry.threshold <= entry.band_high


# --- Calibrations record the method -------------------------------------------------------------


def label_rows(n: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    y[:2] = 1, 0
    ids = [f"r{i}" for i in range(n)]
    truth = pd.DataFrame({"report_id": ids, "condition": "fracture", "level": "", "label": y})
    labels = pd.DataFrame({"report_id": ids, "condition": "fracture", "level": None,
                           "score": expit(2.5 * y + rng.normal(1, 1, n)), "method": "direct",
                           "model": "m", "engine": "transformers", "prompt_hash": "p",
                           "definition_hash": "d"})
    return labels, truth


def test_calibration_records_method_and_parameters(tmp_path):
    labels, truth = label_rows()
    calibration = build_calibration(labels, truth, threshold_method="bootstrap_eer",
                                    threshold_params={"resamples": 11})
    assert calibration.threshold_method == "bootstrap_eer"
    assert calibration.threshold_params == {"resamples": 11, "seed": 0}
    calibration.save(tmp_path / "cal.json")
    loaded = Calibration.load(tmp_path / "cal.json")
    assert loaded == calibration and loaded.calibration_id == calibration.calibration_id
    assert json.loads((tmp_path / "cal.json").read_text())["threshold_method"] == "bootstrap_eer"
    text = describe(loaded)
    assert "thresholds: bootstrap_eer (resamples=11, seed=0): median EER threshold" in text
    plain = build_calibration(labels, truth, threshold_method="eer")
    assert plain.calibration_id != dataclasses.replace(
        plain, threshold_method="eer_binormal").calibration_id


def test_default_method_is_the_documented_one():
    labels, truth = label_rows()
    assert build_calibration(labels, truth).threshold_method == DEFAULT_THRESHOLD_METHOD
    assert method_params(DEFAULT_THRESHOLD_METHOD) == THRESHOLD_METHODS[
        DEFAULT_THRESHOLD_METHOD].defaults


def test_a_file_from_before_threshold_methods_loads_as_eer_with_its_id(tmp_path):
    """A format-2 file written before the method was recorded: no threshold_method field. It
    is the paper's EER and keeps the calibration id it was written with (cal-b3d050837a03,
    what this calibration's id was before the fields existed), so label folders made with it
    still resume."""
    data = make_calibration().to_dict()
    del data["threshold_method"], data["threshold_params"]
    data["calibration_id"] = "cal-b3d050837a03"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = Calibration.load(path)
    assert loaded.threshold_method == "eer" and loaded.threshold_params == {}
    assert loaded.calibration_id == "cal-b3d050837a03"
    assert "thresholds: eer: the paper's" in describe(loaded)


def write_labels(folder: Path, rows: pd.DataFrame) -> str:
    (folder / "labels").mkdir(parents=True)
    rows.to_parquet(folder / "labels" / "part-0.parquet")
    return str(folder)


def test_calibrate_job_takes_a_method_and_says_which(tmp_path, capsys):
    labels, truth = label_rows()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    run = write_labels(tmp_path / "run", labels)
    for method in ("eer", "eer_smoothed"):
        out = tmp_path / f"{method}.json"
        calibrate_job.main(["--labels", run, "--truth", str(tmp_path / "truth.csv"),
                            "--out", str(out), "--threshold-method", method])
        assert Calibration.load(out).threshold_method == method
        assert f"thresholds: {method}" in capsys.readouterr().out
    out = tmp_path / "default.json"
    calibrate_job.main(["--labels", run, "--truth", str(tmp_path / "truth.csv"),
                        "--out", str(out)])
    assert Calibration.load(out).threshold_method == DEFAULT_THRESHOLD_METHOD
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        calibrate_job.main(["--labels", run, "--truth", str(tmp_path / "truth.csv"),
                            "--out", str(out), "--threshold-method", "median"])


def test_evaluation_can_choose_thresholds_by_another_method():
    from ray_app.evaluation.runs import EvaluationConfig, Run, evaluate_runs

    labels, truth = label_rows(200, seed=1)
    metrics = {m: evaluate_runs([Run("r", labels)], truth,
                                EvaluationConfig(bootstrap=10, threshold_method=m))
               for m in ("eer", "eer_binormal")}
    assert metrics["eer"]["threshold_source"][0] == "EER on 60 calibration reports"
    assert metrics["eer_binormal"]["threshold_source"][0] == "eer_binormal on 60 calibration reports"
    assert metrics["eer"]["threshold"][0] != metrics["eer_binormal"]["threshold"][0]
    with pytest.raises(CalibrationError, match="unknown threshold method"):
        evaluate_runs([Run("r", labels)], truth, EvaluationConfig(threshold_method="median"))


def test_calibrate_job_passes_method_parameters(tmp_path):
    labels, truth = label_rows()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    run = write_labels(tmp_path / "run", labels)
    out = tmp_path / "cal.json"
    base = ["--labels", run, "--truth", str(tmp_path / "truth.csv"), "--out", str(out)]
    calibrate_job.main([*base, "--threshold-method", "bootstrap_eer", "--threshold-param",
                        "resamples=31", "--threshold-param", "seed=2"])
    assert Calibration.load(out).threshold_params == {"resamples": 31, "seed": 2}
    calibrate_job.main([*base, "--threshold-method", "eer_smoothed",
                        "--threshold-param", "bandwidth=1.5"])
    assert Calibration.load(out).threshold_params == {"bandwidth": 1.5}
    with pytest.raises(CalibrationError, match=r"takes no parameter\(s\) \['seed'\]"):
        calibrate_job.main([*base, "--threshold-method", "eer_smoothed",
                            "--threshold-param", "seed=1"])
    with pytest.raises(SystemExit, match="must be a number"):
        calibrate_job.main([*base, "--threshold-param", "seed=x"])
