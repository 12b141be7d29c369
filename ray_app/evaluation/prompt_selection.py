"""Rank prompt variants by how well their scores separate the classes on hand-labelled reports.

The ankle-fracture study chose among 31 variants on a labelled subset; here each variant is run
through the labelling job, and this ranks them: mean AUROC over the (condition, level) questions,
then the worst question's AUROC, then mean EER. Rank on the calibration split only, and evaluate
the winner on reports it was not chosen on.
"""

from __future__ import annotations

import pandas as pd

from ray_app.evaluation.calibration import join_truth, threshold_entry


def variant_scores(name: str, labels: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """AUROC and EER per question of one variant, with the summary used to rank it."""
    joined = join_truth(labels, truth)
    row: dict = {"variant": name, "prompt_hash": labels["prompt_hash"].iloc[0]}
    aurocs, eers = [], []
    for (condition, level), group in joined.groupby(["condition", "level"], sort=True):
        if group["label"].nunique() < 2:
            continue
        entry = threshold_entry(condition, level or None, group["label"].astype(int),
                                group["score"])
        key = f"{condition} at {level}" if level else condition
        row[f"auroc {key}"] = entry.auroc
        aurocs.append(entry.auroc)
        eers.append(entry.eer)
    if not aurocs:
        raise ValueError(f"variant {name!r}: no question has both classes in the hand labels")
    row.update(mean_auroc=sum(aurocs) / len(aurocs), min_auroc=min(aurocs),
               mean_eer=sum(eers) / len(eers))
    return row


def rank_variants(results: dict[str, pd.DataFrame], truth: pd.DataFrame) -> pd.DataFrame:
    """One row per variant, best first."""
    table = pd.DataFrame([variant_scores(name, labels, truth) for name, labels in results.items()])
    table = table.sort_values(["mean_auroc", "min_auroc", "mean_eer"],
                              ascending=[False, False, True], kind="stable")
    return table.reset_index(drop=True).rename_axis("rank").reset_index().assign(
        rank=lambda t: t["rank"] + 1)
