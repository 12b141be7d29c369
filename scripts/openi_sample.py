"""Write a stratified sample of the Open-i development reports (outside the repository: the data
may not be copied into it) as a report table plus a truth table in the calibration format.

    python scripts/openi_sample.py --out /tmp/openi --findings cardiomegaly pleural_effusion \
        --per-stratum 1:1=all 0:1=all 1:0=90 0:0=120

With many findings, quotas per combination get unwieldy: `--positives` takes N positives of each
finding (overlaps count once) and `--negatives` N reports negative for all of them:

    python scripts/openi_sample.py --out /tmp/openi5 --findings cardiomegaly pleural_effusion \
        pneumothorax atelectasis fracture --positives pneumothorax=all cardiomegaly=35 \
        pleural_effusion=35 atelectasis=35 fracture=35 --negatives 50

`--exclude` leaves out the reports of earlier samples (a training set disjoint from an
evaluation set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "openi" / "reports_dev.csv"


def report_text(row: pd.Series) -> str:
    """The README's natural report text: findings and impression, empty sections left out."""
    parts = [f"{name.upper()}: {row[name].strip()}" for name in ("findings", "impression")
             if isinstance(row[name], str) and row[name].strip()]
    return "\n".join(parts)


def stratified(data: pd.DataFrame, findings: list[str], quotas: dict[str, str], seed: int):
    picked = []
    for key, group in data.groupby(findings):
        stratum = ":".join(str(int(v)) for v in (key if isinstance(key, tuple) else (key,)))
        quota = quotas.get(stratum, "0")
        take = len(group) if quota == "all" else min(int(quota), len(group))
        picked.append(group.sample(n=take, random_state=seed))
    return pd.concat(picked).sample(frac=1.0, random_state=seed)


def enriched(data: pd.DataFrame, findings: list[str], positives: dict[str, str], negatives: int,
             seed: int) -> pd.DataFrame:
    picked = []
    for finding, quota in positives.items():
        pool = data[(data[finding] == 1) & ~data.index.isin([i for p in picked for i in p.index])]
        take = len(pool) if quota == "all" else min(int(quota), len(pool))
        picked.append(pool.sample(n=take, random_state=seed))
    clean = data[(data[findings] == 0).all(axis=1)]
    picked.append(clean.sample(n=min(negatives, len(clean)), random_state=seed))
    return pd.concat(picked).sample(frac=1.0, random_state=seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", required=True)
    parser.add_argument("--findings", nargs="+", default=["cardiomegaly", "pleural_effusion"])
    parser.add_argument("--per-stratum", nargs="+", default=["1:1=all", "0:1=all", "1:0=90", "0:0=120"],
                        help="quota per combination of finding labels, e.g. 1:0=90 or 0:0=all")
    parser.add_argument("--positives", nargs="+", default=None,
                        help="instead of --per-stratum: positives per finding, e.g. fracture=35")
    parser.add_argument("--negatives", type=int, default=0,
                        help="with --positives: reports negative for every finding")
    parser.add_argument("--exclude", nargs="+", default=[],
                        help="report tables (report_id column) whose reports are left out, "
                             "e.g. an evaluation sample, so that a training sample is disjoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = pd.read_csv(args.data, dtype={"uid": str})
    for table in args.exclude:
        data = data[~data["uid"].isin(pd.read_csv(table, dtype={"report_id": str})["report_id"])]
    data["text"] = data.apply(report_text, axis=1)
    data = data[data["text"] != ""]
    if args.positives:
        wanted = dict(q.split("=") for q in args.positives)
        sample = enriched(data, args.findings, wanted, args.negatives, args.seed)
    else:
        quotas = dict(q.split("=") for q in args.per_stratum)
        sample = stratified(data, args.findings, quotas, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample.rename(columns={"uid": "report_id"})[["report_id", "text"]].to_csv(
        out / "reports.csv", index=False)
    truth = sample.melt(id_vars="uid", value_vars=args.findings, var_name="condition",
                        value_name="label").rename(columns={"uid": "report_id"})
    truth.assign(level="")[["report_id", "condition", "level", "label"]].to_csv(
        out / "truth.csv", index=False)
    print(f"{len(sample)} reports -> {out}; positives: "
          + ", ".join(f"{f} {int(sample[f].sum())}" for f in args.findings))


if __name__ == "__main__":
    main()
