"""Prompt ensembles: combining variants' scores (ray_app/evaluation/prompt_selection.py),
ranking combinations, jobs/combine_runs.py, and select_prompt's choice of a combination."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from ray_app.evaluation.calibration import Calibration, CalibrationError
from ray_app.evaluation.prompt_selection import (
    CombinationError,
    combination_is_better,
    combination_members,
    combine_label_rows,
    combine_scores,
    ensemble_hash,
    rank_combinations,
    rank_variants,
)
from ray_app.pipeline.report_tables import LABEL_SCHEMA, read_label_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "jobs"))
import calibrate as calibrate_job  # noqa: E402
import combine_runs as combine_job  # noqa: E402
import evaluate as evaluate_job  # noqa: E402
import select_prompt as select_job  # noqa: E402


def test_combination_is_the_mean_of_log_odds():
    # logit(0.9) = ln 9; half of it is ln 3, and sigmoid(ln 3) = 3 / 4.
    assert combine_scores([[0.9], [0.5]])[0] == pytest.approx(0.75, abs=1e-15)
    assert combine_scores([[0.2, 0.9], [0.8, 0.9]]) == pytest.approx([0.5, 0.9], abs=1e-15)
    # A geometric mean of odds: odds 1, 4 and 16 give odds 4.
    assert combine_scores([[0.5], [0.8], [16 / 17]])[0] == pytest.approx(0.8, abs=1e-12)


def test_saturated_scores_stay_finite_and_ordered():
    combined = combine_scores([[1.0, 1.0, 0.0], [0.9, 1.0, 1.0]])
    assert np.isfinite(combined).all()
    assert 0.9 < combined[0] < combined[1] < 1.0  # 1.0 with 0.9 below 1.0 with 1.0
    assert combined[2] == pytest.approx(0.5)  # a certain no and a certain yes cancel


def test_ensemble_hash_ignores_order():
    assert ensemble_hash(["b2", "a1"]) == ensemble_hash(["a1", "b2"]) == "ens:a1+b2"


N = 200


def truth_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"report_id": [f"r{i}" for i in range(N)], "condition": "fracture",
                         "level": "", "label": (rng.random(N) < 0.3).astype(int)})


def variant_rows(truth: pd.DataFrame, prompt_hash: str, seed: int, noise: float = 1.5,
                 **setup) -> pd.DataFrame:
    """Label rows whose log-odds are the truth plus independent noise: each variant errs on
    different reports, which is what an ensemble averages away."""
    rng = np.random.default_rng(seed)
    z = 2.0 * truth["label"].to_numpy() - 1.0 + rng.normal(0, noise, len(truth))
    columns = {"method": "direct", "model": "m", "engine": "transformers",
               "definition_hash": "d", **setup}
    return truth[["report_id", "condition"]].assign(
        level=None, score=expit(z), prompt_hash=prompt_hash, truncated=False, **columns)


def test_combined_rows_are_a_label_table():
    truth = truth_table()
    a, b = variant_rows(truth, "h2", 1), variant_rows(truth, "h1", 2)
    b.loc[5, "truncated"] = True
    rows = combine_label_rows({"a": a, "b": b.iloc[::-1]})  # row order does not matter
    assert len(rows) == N and set(LABEL_SCHEMA.names) - {"code_version", "labelled_at"} <= set(rows)
    assert (rows["prompt_hash"] == "ens:h1+h2").all() and rows["label"].isna().all()
    assert rows["level"].isna().all() and (rows["model"] == "m").all()
    by_id = rows.set_index("report_id")
    expected = combine_scores([a["score"], b["score"]])
    assert by_id.loc[a["report_id"], "score"].to_numpy() == pytest.approx(expected, abs=1e-15)
    assert by_id.loc["r5", "truncated"] and by_id["truncated"].sum() == 1


def test_level_questions_keep_their_level():
    truth = truth_table()
    a, b = variant_rows(truth, "h1", 1), variant_rows(truth, "h2", 2)
    a, b = (pd.concat([r, r.assign(level="L4-L5", score=r["score"] / 2)]) for r in (a, b))
    rows = combine_label_rows({"a": a, "b": b})
    assert len(rows) == 2 * N
    assert rows["level"].isna().sum() == N and (rows["level"] == "L4-L5").sum() == N
    level = rows[rows["level"] == "L4-L5"].set_index("report_id")["score"]
    expected = combine_scores([a.loc[a["level"] == "L4-L5", "score"],
                               b.loc[b["level"] == "L4-L5", "score"]])
    assert level.loc[a.loc[a["level"] == "L4-L5", "report_id"]].to_numpy() == pytest.approx(
        expected, abs=1e-15)


@pytest.mark.parametrize("setup, message", [
    ({"model": "other-model"}, r"model: 'm' \(in a\) vs 'other-model' \(in b\)"),
    ({"method": "summary"}, r"method: 'direct' \(in a\) vs 'summary' \(in b\)"),
    ({"engine": "vllm"}, r"engine: 'transformers' \(in a\) vs 'vllm' \(in b\)"),
    ({"definition_hash": "d2"}, r"definition of fracture: 'd' \(in a\) vs 'd2' \(in b\)"),
])
def test_runs_of_different_setups_are_refused(setup, message):
    truth = truth_table()
    runs = {"a": variant_rows(truth, "h1", 1), "b": variant_rows(truth, "h2", 2, **setup)}
    with pytest.raises(CombinationError, match=message) as info:
        combine_label_rows(runs)
    assert "combine only runs that differ in their prompt" in str(info.value)
    assert isinstance(info.value, CalibrationError)  # an input error for the jobs


def test_same_prompt_twice_one_run_and_nested_ensembles_are_refused():
    truth = truth_table()
    a = variant_rows(truth, "h1", 1)
    with pytest.raises(CombinationError, match=r"same prompt: h1 \(a, b\)"):
        combine_label_rows({"a": a, "b": variant_rows(truth, "h1", 2)})
    with pytest.raises(CombinationError, match=r"at least two label runs, got 1"):
        combine_label_rows({"a": a})
    nested = combine_label_rows({"a": a, "b": variant_rows(truth, "h2", 2)})
    with pytest.raises(CombinationError, match=r"run 'e' is an ensemble already"):
        combine_label_rows({"e": nested, "c": variant_rows(truth, "h3", 3)})
    mixed = pd.concat([a.iloc[:100], variant_rows(truth, "h9", 9).iloc[100:]])
    with pytest.raises(CombinationError, match=r"run 'm': .*prompt_hash: 'h1' vs 'h9'"):
        combine_label_rows({"m": mixed, "b": variant_rows(truth, "h2", 2)})


def test_runs_over_different_reports_are_refused_unless_common_only():
    truth = truth_table()
    a, b = variant_rows(truth, "h1", 1), variant_rows(truth, "h2", 2).iloc[:150]
    with pytest.raises(CombinationError, match=r"150 are shared, and these runs have more "
                                               r"\(a: 50\).*--common-only"):
        combine_label_rows({"a": a, "b": b})
    assert len(combine_label_rows({"a": a, "b": b}, common_only=True)) == 150
    with pytest.raises(CombinationError, match=r"scores 1 question\(s\) twice"):
        combine_label_rows({"a": pd.concat([a, a.iloc[:1]]), "b": variant_rows(truth, "h2", 2)})


def test_a_combination_of_independent_variants_ranks_above_each():
    truth = truth_table()
    results = {name: variant_rows(truth, f"h{k}", k) for k, name in enumerate("abc")}
    singles = rank_variants(results, truth)
    combos = rank_combinations(results, truth, singles)
    assert list(combos["members"]) == [3, 2, 2, 2]
    assert combos["mean_auroc"][0] > singles["mean_auroc"][0] + 0.03
    assert combination_is_better(combos.iloc[0], singles.iloc[0])
    assert combination_members(combos.iloc[0], singles) == list(singles["variant"])
    assert combos["prompt_hash"][0] == "ens:h0+h1+h2"


def test_a_combination_that_adds_nothing_keeps_the_single_variant():
    truth = truth_table()
    sharp = truth[["report_id", "condition"]].assign(  # separates perfectly: AUROC 1.0
        level=None, score=0.2 + 0.6 * truth["label"], prompt_hash="hs", method="direct",
        model="m", engine="transformers", definition_hash="d")
    results = {"sharp": sharp, "noisy": variant_rows(truth, "hn", 1, noise=3.0)}
    singles = rank_variants(results, truth)
    combos = rank_combinations(results, truth, singles)
    assert singles["variant"][0] == "sharp" and singles["mean_auroc"][0] == 1.0
    assert not combination_is_better(combos.iloc[0], singles.iloc[0])


def test_rank_combinations_takes_the_top_variants_only():
    truth = truth_table()
    results = {f"v{k}": variant_rows(truth, f"h{k}", k, noise=1.0 + k / 2) for k in range(6)}
    combos = rank_combinations(results, truth, top=3)
    assert len(combos) == 3 + 1  # C(3,2) + C(3,3)
    members = set("+".join(combos["variant"]).split("+"))
    assert members == set(rank_variants(results, truth)["variant"][:3])


def write_run(folder: Path, rows: pd.DataFrame) -> str:
    (folder / "labels").mkdir(parents=True)
    rows.to_parquet(folder / "labels" / "part-0.parquet")
    return str(folder)


def test_select_prompt_writes_the_better_combination(tmp_path):
    truth = truth_table()
    results = {name: variant_rows(truth, f"h{k}", k) for k, name in enumerate(["a", "b"])}
    ranking = rank_variants(results, truth)
    text = select_job.select_combination(results, truth, ranking, tmp_path)
    assert "chosen combination: " in text and "best single" in text
    combos = pd.read_csv(tmp_path / "combinations.csv")
    assert list(combos["variant"]) == ["+".join(ranking["variant"])]
    calibration = Calibration.load(tmp_path / "combination_calibration.json")
    assert calibration.prompt_hash == "ens:h0+h1" == combos["prompt_hash"][0]
    labels = read_label_rows(str(tmp_path / "combination"))
    assert len(labels) == N and (labels["prompt_hash"] == "ens:h0+h1").all()


def test_select_prompt_keeps_a_single_variant_that_no_combination_beats(tmp_path):
    truth = truth_table()
    sharp = variant_rows(truth, "hs", 0, noise=0.01)
    results = {"sharp": sharp, "noisy": variant_rows(truth, "hn", 1, noise=4.0)}
    ranking = rank_variants(results, truth)
    text = select_job.select_combination(results, truth, ranking, tmp_path)
    assert "kept the single variant sharp" in text
    assert not (tmp_path / "combination_calibration.json").exists()


def test_combine_job_output_calibrates_evaluates_and_labels(tmp_path, capsys):
    truth = truth_table()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    runs = [write_run(tmp_path / name, variant_rows(truth, f"h{k}", k))
            for k, name in enumerate(["paper", "terse", "short"])]
    out = tmp_path / "ens"
    combine_job.main(["--labels", *runs, "--out", str(out)])
    labels = read_label_rows(str(out))
    assert len(labels) == N and set(labels["prompt_hash"]) == {"ens:h0+h1+h2"}
    assert list(labels.columns) == LABEL_SCHEMA.names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ensemble_of"] == runs and manifest["prompt_hash"] == "ens:h0+h1+h2"

    cal = tmp_path / "ens_cal.json"
    calibrate_job.main(["--labels", str(out), "--truth", str(tmp_path / "truth.csv"),
                        "--out", str(cal)])
    assert Calibration.load(cal).prompt_hash == "ens:h0+h1+h2"
    evaluate_job.main(["--truth", str(tmp_path / "truth.csv"), "--out", str(tmp_path / "eval"),
                       "--run", f"ensemble={out}", "--run", f"paper={runs[0]}",
                       "--bootstrap", "50"])
    assert "| ensemble | " in (tmp_path / "eval" / "report.md").read_text()

    # Combining again into the same folder, now with the calibration, replaces the table.
    combine_job.main(["--labels", *runs, "--out", str(out), "--calibration", str(cal)])
    labelled = read_label_rows(str(out))
    assert len(labelled) == N and labelled["label"].notna().all()
    assert (labelled["label"] == (labelled["score"] >= labelled["threshold"])).all()
    assert set(labelled["calibration_id"]) == {Calibration.load(cal).calibration_id}
    capsys.readouterr()

    # A calibration of one member is refused for the ensemble.
    single = tmp_path / "paper_cal.json"
    calibrate_job.main(["--labels", runs[0], "--truth", str(tmp_path / "truth.csv"),
                        "--out", str(single)])
    with pytest.raises(CalibrationError, match=r"prompt hash ens:h0\+h1\+h2 \(calibrated: h0\)"):
        combine_job.main(["--labels", *runs, "--out", str(tmp_path / "ens2"),
                          "--calibration", str(single)])


def test_combine_job_refuses_mismatched_runs_and_a_used_folder(tmp_path):
    truth = truth_table()
    a = write_run(tmp_path / "a", variant_rows(truth, "h1", 1))
    b = write_run(tmp_path / "b", variant_rows(truth, "h2", 2, model="other"))
    with pytest.raises(CombinationError, match=r"at least two label runs, got 1"):
        combine_job.main(["--labels", a, "--out", str(tmp_path / "ens")])
    with pytest.raises(CombinationError, match=r"model: 'm' \(in .*a\) vs 'other'"):
        combine_job.main(["--labels", a, b, "--out", str(tmp_path / "ens")])
    c = write_run(tmp_path / "c", variant_rows(truth, "h3", 3))
    from ray_app.pipeline.cli import InputError

    with pytest.raises(InputError, match=r"already holds label parts of another job"):
        combine_job.main(["--labels", a, c, "--out", a])
