"""Rank prompt variants, and combinations of them, by how well their scores separate the classes
on hand-labelled reports.

The ankle-fracture study chose among 31 variants on a labelled subset; here each variant is run
through the labelling job, and this ranks them: mean AUROC over the (condition, level) questions,
then the worst question's AUROC, then mean EER. Rank on the calibration split only, and evaluate
the winner on reports it was not chosen on.

A prompt ensemble scores a report with several variants and combines the scores as the mean of
their log-odds, mapped back to a probability: sigmoid(mean(logit(score))). Combinations are
ranked by the same criteria; an ensemble label table (combine_label_rows) carries the prompt
hash "ens:" + the members' sorted hashes, so it is calibrated and evaluated like any run.
"""

from __future__ import annotations

import logging
from itertools import combinations
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from ray_app.evaluation.calibration import (
    SOURCE_COLUMN,
    TRUTH_KEY,
    CalibrationError,
    check_one_setup,
    join_truth,
)
from ray_app.evaluation.thresholds import eer_threshold, log_odds

log = logging.getLogger(__name__)

ENSEMBLE_PREFIX = "ens:"
RANK_KEYS = (["mean_auroc", "min_auroc", "mean_eer"], [False, False, True])


class CombinationError(CalibrationError):
    """Label runs that cannot be combined into one ensemble (an input error for the jobs)."""


def variant_scores(name: str, labels: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """AUROC and EER per question of one variant, with the summary used to rank it."""
    joined = join_truth(labels, truth)
    row: dict = {"variant": name, "prompt_hash": labels["prompt_hash"].iloc[0]}
    aurocs, eers = [], []
    for (condition, level), group in joined.groupby(["condition", "level"], sort=True):
        if group["label"].nunique() < 2:
            continue
        y = group["label"].astype(int)
        key = f"{condition} at {level}" if level else condition
        row[f"auroc {key}"] = float(roc_auc_score(y, group["score"]))
        aurocs.append(row[f"auroc {key}"])
        eers.append(eer_threshold(y, group["score"])[1])
    if not aurocs:
        raise ValueError(f"variant {name!r}: no question has both classes in the hand labels")
    row.update(mean_auroc=sum(aurocs) / len(aurocs), min_auroc=min(aurocs),
               mean_eer=sum(eers) / len(eers))
    return row


def rank_variants(results: dict[str, pd.DataFrame], truth: pd.DataFrame) -> pd.DataFrame:
    """One row per variant, best first."""
    table = pd.DataFrame([variant_scores(name, labels, truth) for name, labels in results.items()])
    return _ranked(table)


def _ranked(table: pd.DataFrame, extra_keys: tuple[list, list] = ([], [])) -> pd.DataFrame:
    table = table.sort_values(RANK_KEYS[0] + extra_keys[0],
                              ascending=RANK_KEYS[1] + extra_keys[1], kind="stable")
    return table.reset_index(drop=True).rename_axis("rank").reset_index().assign(
        rank=lambda t: t["rank"] + 1)


# --- Ensembles ----------------------------------------------------------------------------------


def combine_scores(scores: Sequence[Sequence[float]]) -> np.ndarray:
    """Per row, sigmoid of the mean log-odds of the members' scores (log-odds clipped as the
    threshold methods clip them, so a saturated 1.0 counts as a very confident yes, not inf)."""
    if not len(scores):
        raise CombinationError("an ensemble needs at least one member")
    return expit(np.mean([log_odds(s) for s in scores], axis=0))


def ensemble_hash(prompt_hashes: Sequence[str]) -> str:
    """The prompt identity of a combination: the same members in any order give the same."""
    return ENSEMBLE_PREFIX + "+".join(sorted(prompt_hashes))


def combine_label_rows(runs: dict[str, pd.DataFrame], common_only: bool = False) -> pd.DataFrame:
    """One ensemble label row per (report, condition, level) of the runs (name -> label rows of
    one labelling run each), in the labelling job's columns: the combined score, no label yet,
    the shared model, engine, method and definitions, and the ensemble's prompt hash.

    Refused (CombinationError, naming the runs): fewer than two runs, a run made with more
    than one setup, runs with different models, engines, methods or definitions, a prompt
    used twice, an ensemble as a member, and questions that some runs lack (unless
    `common_only`, which keeps the questions every run has)."""
    if len(runs) < 2:
        raise CombinationError(f"an ensemble needs at least two label runs, got {len(runs)}")
    hashes = {name: _one_setup(name, rows) for name, rows in runs.items()}
    _check_same_setup(runs)
    _check_distinct_prompts(hashes)
    keyed = {name: _keyed_scores(name, rows) for name, rows in runs.items()}
    keys = _shared_keys(keyed, common_only)
    first = next(iter(runs.values())).iloc[0]
    members = [keyed[name].loc[keys] for name in runs]
    frame = keys.to_frame(index=False)
    return frame.assign(
        level=[level or None for level in frame["level"]],
        method=first.get("method"),
        score=combine_scores([m["score"].to_numpy(dtype=float) for m in members]),
        label=None, threshold=None, uncertain=None, summary=None, evidence=None,
        truncated=np.any([m["truncated"].fillna(False).astype(bool) for m in members], axis=0),
        model=first.get("model"), engine=first.get("engine"),
        definition_hash=members[0]["definition_hash"].to_numpy(),
        prompt_hash=ensemble_hash(list(hashes.values())), calibration_id=None)


def _one_setup(name: str, rows: pd.DataFrame) -> str:
    try:
        check_one_setup(rows)
    except CalibrationError as err:
        raise CombinationError(f"run {name!r}: {err}") from err
    prompt_hash = str(rows["prompt_hash"].iloc[0])
    if prompt_hash.startswith(ENSEMBLE_PREFIX):
        raise CombinationError(f"run {name!r} is an ensemble already ({prompt_hash}): combine "
                               "its member runs with the others instead")
    return prompt_hash


def _check_same_setup(runs: dict[str, pd.DataFrame]) -> None:
    """The members may differ only in their prompt: anything else would make the combination
    a mixture of setups that no single calibration describes."""
    every = pd.concat([rows.drop(columns=[SOURCE_COLUMN], errors="ignore")
                       .assign(**{SOURCE_COLUMN: name, "prompt_hash": "-"})
                       for name, rows in runs.items()], ignore_index=True)
    try:
        check_one_setup(every)
    except CalibrationError as err:
        text = str(err).split(". A calibration holds")[0]
        raise CombinationError(
            f"{text.replace('the label rows were made', 'the runs were made')}. An ensemble "
            "combines prompt variants of one model, engine, method and set of condition "
            "definitions: combine only runs that differ in their prompt") from err


def _check_distinct_prompts(hashes: dict[str, str]) -> None:
    seen: dict[str, list[str]] = {}
    for name, prompt_hash in hashes.items():
        seen.setdefault(prompt_hash, []).append(name)
    twice = [f"{h} ({', '.join(names)})" for h, names in seen.items() if len(names) > 1]
    if twice:
        raise CombinationError(f"runs made with the same prompt: {'; '.join(twice)}. Each "
                               "member of an ensemble must be a different prompt variant")


def _keyed_scores(name: str, rows: pd.DataFrame) -> pd.DataFrame:
    rows = rows.assign(level=rows["level"].fillna("").astype(str),
                       report_id=rows["report_id"].astype(str))
    rows = rows.assign(**{c: None for c in ("truncated", "definition_hash") if c not in rows})
    doubled = rows.duplicated(TRUTH_KEY)
    if doubled.any():
        example = tuple(rows.loc[doubled, TRUTH_KEY].iloc[0])
        raise CombinationError(f"run {name!r} scores {int(doubled.sum())} question(s) twice "
                               f"(e.g. {example}): pass one labelling run per folder")
    return rows.set_index(TRUTH_KEY)[["score", "truncated", "definition_hash"]]


def _shared_keys(keyed: dict[str, pd.DataFrame], common_only: bool) -> pd.MultiIndex:
    names = list(keyed)
    common = keyed[names[0]].index
    for name in names[1:]:
        common = common.intersection(keyed[name].index)
    missing = {name: len(frame.index.difference(common)) for name, frame in keyed.items()}
    if any(missing.values()) and not common_only:
        listed = ", ".join(f"{n}: {k}" for n, k in missing.items() if k)
        raise CombinationError(
            f"the runs do not score the same (report, condition, level) questions: {len(common)}"
            f" are shared, and these runs have more ({listed}). Finish the labelling runs on "
            "the same reports and conditions, or keep the shared questions only (--common-only)")
    if common.empty:
        raise CombinationError("the runs share no (report, condition, level) question")
    if any(missing.values()):
        log.warning("ensemble of the %d question(s) every run scored; left out: %s", len(common),
                    ", ".join(f"{n}: {k}" for n, k in missing.items() if k))
    return common.sort_values()


def rank_combinations(results: dict[str, pd.DataFrame], truth: pd.DataFrame,
                      singles: pd.DataFrame | None = None, top: int = 4,
                      sizes: Sequence[int] = (2, 3)) -> pd.DataFrame:
    """Every combination of `sizes` members of the `top` best single variants (by `singles`,
    rank_variants' table, ranked here when not given), ranked by the same criteria, fewer
    members first on a tie. One row per combination: `variant` names the members joined by
    '+', `members` their count, `prompt_hash` the ensemble's.

    Why the top few, exhaustively, rather than greedy forward selection over all: the scores
    are already there, so C(4,2) + C(4,3) = 10 combinations cost nothing, none is missed by
    greedy's one path; and keeping to the best variants keeps the number of candidates, and
    with it the chance of a winner that only fits the calibration reports, small."""
    singles = rank_variants(results, truth) if singles is None else singles
    best = list(singles["variant"][:top])
    rows = []
    for size in sizes:
        for members in combinations(best, size):
            combined = combine_label_rows({m: results[m] for m in members}, common_only=True)
            rows.append({**variant_scores("+".join(members), combined, truth),
                         "members": size})
    if not rows:
        return pd.DataFrame(columns=["rank", "variant", "prompt_hash", "members"])
    return _ranked(pd.DataFrame(rows), (["members"], [True]))


def combination_is_better(combination: pd.Series, single: pd.Series) -> bool:
    """Does a rank_combinations row beat a rank_variants row by the ranking's criteria? A tie
    keeps the single variant: one prompt costs a fraction of an ensemble's compute."""
    def key(row: pd.Series) -> tuple:
        return row["mean_auroc"], row["min_auroc"], -row["mean_eer"]

    return key(combination) > key(single)


def combination_members(combination: pd.Series, singles: pd.DataFrame) -> list[str]:
    """The variant names of a rank_combinations row, in the singles' rank order (found by
    prompt hash, so a variant name holding '+' cannot confuse them)."""
    hashes = set(str(combination["prompt_hash"])[len(ENSEMBLE_PREFIX):].split("+"))
    return [v for v, h in zip(singles["variant"], singles["prompt_hash"]) if h in hashes]
