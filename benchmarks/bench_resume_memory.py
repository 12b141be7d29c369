"""Resume state at archive size: driver and per-actor peak memory of a label job resumed over
N synthetic reports x 3 conditions with half of them already labelled (dry-run engine).

    python benchmarks/bench_resume_memory.py                       # 0.1M, 1M and 5M reports
    python benchmarks/bench_resume_memory.py --sizes 100000 1000000

Each size runs `jobs/label_reports.py` in its own process on its own local Ray, so its driver
peak is its own. The finished labels are written straight to Parquet (as a crashed run would
have left them, every other report done) with the manifest the job expects. What must hold:
per-actor peak memory flat as the archive grows; the driver's growing far slower than the
archive (printed side by side with the input's size and the finished rows it indexes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_app.engines import EngineConfig  # noqa: E402
from ray_app.pipeline import report_tables as tables
from ray_app.pipeline.label_job import LabelJobConfig, check_resume, run_setup  # noqa: E402

CONDITIONS = ["cardiomegaly", "pleural_effusion", "atelectasis"]
FINDINGS = ["Heart size is normal.", "Mild cardiomegaly.", "Small left pleural effusion.",
            "Bibasilar atelectasis.", "Lungs are clear.", "No pneumothorax."]
ROWS_PER_FILE = 250_000


def write_archive(folder: Path, n: int) -> int:
    """N reports in Parquet files; returns the input's size in bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for start in range(0, n, ROWS_PER_FILE):
        ids = [f"acc{i:09d}" for i in range(start, min(n, start + ROWS_PER_FILE))]
        picks = rng.integers(0, len(FINDINGS), size=(len(ids), 2))
        texts = [f"FINDINGS: {FINDINGS[a]} {FINDINGS[b]} IMPRESSION: see findings ({i})."
                 for i, (a, b) in zip(ids, picks)]
        pq.write_table(pa.table({"report_id": ids, "text": texts}),
                       folder / f"reports-{start:09d}.parquet")
    return sum(p.stat().st_size for p in folder.iterdir())


def write_half_done(cfg: LabelJobConfig, n: int) -> int:
    """Every other report labelled for every condition, as a crashed run leaves them."""
    out = tables.locate(cfg.output)
    identity = run_setup(cfg).identity()
    check_resume(out, identity)
    model = identity["model"]
    written = 0
    for start in range(0, n, ROWS_PER_FILE):
        ids = [f"acc{i:09d}" for i in range(start, min(n, start + ROWS_PER_FILE), 2)]
        rows = len(ids) * len(CONDITIONS)
        table = pa.table({
            "report_id": [i for i in ids for _ in CONDITIONS],
            "condition": CONDITIONS * len(ids),
            "method": ["direct"] * rows, "score": np.full(rows, 0.5), "model": [model] * rows,
        })
        full = pa.Table.from_pydict(
            {f.name: table[f.name] if f.name in table.column_names else pa.nulls(rows, f.type)
             for f in tables.LABEL_SCHEMA}, schema=tables.LABEL_SCHEMA)
        tables.write_table_atomically(full, out.child("labels"))
        written += rows
    return written


def run_size(n: int, work: Path, reports_per_batch: int, timeout: float) -> dict:
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    input_bytes = write_archive(folder / "reports", n)
    cfg = LabelJobConfig(input=str(folder / "reports"), output=str(folder / "out"),
                         conditions=CONDITIONS, input_format="parquet",
                         engine=EngineConfig(engine="dry-run", model="bench"))
    done_rows = write_half_done(cfg, n)
    command = [sys.executable, str(REPO / "jobs" / "label_reports.py"), "--input", cfg.input,
               "--input-format", "parquet", "--output", cfg.output, "--conditions", *CONDITIONS,
               "--engine", "dry-run", "--model", "bench",
               "--reports-per-batch", str(reports_per_batch), "--progress-every-s", "60"]
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout,
                         start_new_session=True)
    seconds = time.monotonic() - started
    summary = re.search(r"JobSummary\((.*)\)", job.stdout)
    if job.returncode or not summary:
        raise SystemExit(f"job failed at n={n}:\n{job.stdout[-2000:]}\n{job.stderr[-4000:]}")
    fields = dict(kv.split("=", 1) for kv in summary.group(1).split(", "))
    labelled = tables.read_finished(tables.locate(cfg.output).child("labels"),
                                    ["report_id", "condition"])
    pairs = len(labelled)
    unique = len(labelled.drop_duplicates())
    shutil.rmtree(folder, ignore_errors=True)
    return {"reports": n, "input_mb": input_bytes / 2**20, "done_rows": done_rows,
            "labelled_rows": int(fields["label_rows"]), "skipped": int(fields["skipped_done"]),
            "driver_mb": float(fields["driver_peak_rss_mb"]),
            "actor_mb": float(fields["actor_peak_rss_mb"]),
            "actor_private_mb": float(fields["actor_peak_private_mb"]), "seconds": seconds,
            "exactly_once": pairs == unique == n * len(CONDITIONS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    parser.add_argument("--reports-per-batch", type=int, default=2048)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_resume_"))
    results = []
    for n in args.sizes:
        results.append(run_size(n, work, args.reports_per_batch, args.timeout))
        print(results[-1], flush=True)
    print("\n| reports | input MB | finished rows indexed | rows labelled | driver peak MB "
          "| per-actor peak RSS MB (incl. object store pages read) | per-actor own MB "
          "| seconds | every pair exactly once |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['reports']:,} | {r['input_mb']:.0f} | {r['skipped']:,} pairs "
              f"({r['done_rows']:,} rows) | {r['labelled_rows']:,} | {r['driver_mb']:.0f} "
              f"| {r['actor_mb']:.0f} | {r['actor_private_mb']:.0f} | {r['seconds']:.0f} "
              f"| {r['exactly_once']} |")


if __name__ == "__main__":
    main()
