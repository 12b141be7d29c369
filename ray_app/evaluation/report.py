"""The evaluation report: Markdown tables (like the paper's Tables 2 and 3) and PNG plots: ROC
curves with the operating point, score histograms by class, and a reliability diagram."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ray_app.evaluation.runs import Run  # noqa: E402

TABLE_METRICS = (("auroc", "AUROC"), ("eer", "EER"), ("balanced_accuracy", "bal. acc"),
                 ("f1", "F1"), ("sensitivity", "sens"), ("specificity", "spec"))


def cell(row: pd.Series, metric: str) -> str:
    value, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if not math.isnan(low) else f"{value:.3f}"


def group_title(condition: str, level: str) -> str:
    return f"{condition} at {level}" if level else condition


def summary_table(metrics: pd.DataFrame, metric: str) -> list[str]:
    """Runs down, (condition, level) across: one metric with its interval."""
    groups = list(dict.fromkeys(zip(metrics["condition"], metrics["level"])))
    lines = ["| run | " + " | ".join(group_title(c, lv) for c, lv in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for run, rows in metrics.groupby("run", sort=False):
        by_group = {(r.condition, r.level): r for _, r in rows.iterrows()}
        cells = [cell(by_group[g], metric) if g in by_group else "-" for g in groups]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return lines


def group_table(rows: pd.DataFrame) -> list[str]:
    header = " | ".join(label for _, label in TABLE_METRICS)
    lines = [f"| run | n | pos | {header} | threshold |", "|---|---|---|" + "---|" * 7]
    for _, r in rows.iterrows():
        cells = " | ".join(cell(r, m) for m, _ in TABLE_METRICS)
        threshold = "n/a" if math.isnan(r["threshold"]) else f"{r['threshold']:.6g}"
        lines.append(f"| {r['run']} | {r['n']} | {r['positives']} | {cells} | {threshold} |")
    lines += [f"\n- {r['run']}: {r['threshold_source']}" for _, r in rows.iterrows()
              if math.isnan(r["threshold"])]
    return lines


def run_lines(runs: list[Run]) -> list[str]:
    lines = []
    for run in runs:
        first = run.labels.iloc[0]
        lines.append(f"- **{run.name}**: model `{first['model']}`, method `{first['method']}`, "
                     f"engine `{first['engine']}`, prompt hash `{first['prompt_hash']}`, "
                     f"{len(run.labels)} label rows")
    return lines


def write_report(metrics: pd.DataFrame, runs: list[Run], scored: dict[str, pd.DataFrame],
                 out: Path, header: list[str]) -> Path:
    """report.md, metrics.csv and plots/ under `out`; returns the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(out / "metrics.csv", index=False)
    lines = ["# Labelling evaluation", "", *header, "", "## Runs", "", *run_lines(runs), "",
             "## AUROC (evaluation reports, 95% bootstrap interval)", "",
             *summary_table(metrics, "auroc"), "",
             "## Balanced accuracy at the threshold", "",
             *summary_table(metrics, "balanced_accuracy"), ""]
    for (condition, level), rows in metrics.groupby(["condition", "level"], sort=True):
        title = group_title(condition, level)
        plots = plot_group(condition, level, rows, scored, out / "plots")
        lines += [f"## {title}", "", *group_table(rows), "",
                  *[f"![{kind}](plots/{path.name})" for kind, path in plots.items()], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot_group(condition: str, level: str, rows: pd.DataFrame, scored: dict[str, pd.DataFrame],
               folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{condition}_{level}" if level else condition
    data = {r["run"]: (_group_rows(scored[r["run"]], condition, level), r["threshold"])
            for _, r in rows.iterrows() if not math.isnan(r["threshold"])}
    if not data:
        return {}
    paths = {"ROC": folder / f"{stem}_roc.png", "score histograms": folder / f"{stem}_hist.png",
             "reliability": folder / f"{stem}_reliability.png"}
    _roc_plot(data, group_title(condition, level), paths["ROC"])
    _histograms(data, group_title(condition, level), paths["score histograms"])
    _reliability(data, group_title(condition, level), paths["reliability"])
    return paths


def _group_rows(scored: pd.DataFrame, condition: str, level: str) -> pd.DataFrame:
    return scored[(scored["condition"] == condition) & (scored["level"] == level)]


def _roc_plot(data: dict, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for run, (rows, threshold) in data.items():
        y, s = rows["label"].astype(int), rows["score"]
        fpr, tpr, _ = roc_curve(y, s)
        (line,) = ax.plot(fpr, tpr, label=run)
        predicted = s >= threshold
        ax.plot([predicted[y == 0].mean()], [predicted[y == 1].mean()], "o",
                color=line.get_color(), markeredgecolor="black")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate",
           title=f"{title}: ROC (dot: operating point)")
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def _histograms(data: dict, title: str, path: Path) -> None:
    fig, axes = plt.subplots(len(data), 1, figsize=(6, 2.2 * len(data)), squeeze=False)
    for ax, (run, (rows, threshold)) in zip(axes[:, 0], data.items()):
        for label, name in ((0, "negative"), (1, "positive")):
            ax.hist(rows.loc[rows["label"] == label, "score"], bins=20, range=(0, 1), alpha=0.6,
                    label=name)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set(title=f"{title}: {run}", xlabel="score", ylabel="reports")
        ax.legend(fontsize="small")
    _save(fig, path)


def _reliability(data: dict, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for run, (rows, _) in data.items():
        observed, predicted = calibration_curve(rows["label"].astype(int), rows["score"],
                                                n_bins=10, strategy="uniform")
        ax.plot(predicted, observed, "o-", label=run)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="mean score in bin", ylabel="fraction positive",
           title=f"{title}: reliability")
    ax.legend(loc="upper left", fontsize="small")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
