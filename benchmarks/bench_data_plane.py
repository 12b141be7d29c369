"""Data-plane throughput of the labelling job: read, row checks, prompts, writes, with the
model-free dry-run engine, on a local Ray.

    python benchmarks/bench_data_plane.py [--rows 125000] [--reports-per-batch 4000]

Generates synthetic spine MRI reports (sectioned, 600-900 characters) to a Parquet file in a
temporary folder, labels one condition (spinal_cancer) and prints reports/s and the peak memory
of the whole process tree. Target on 2 cores: >= 2,000 reports/s and peak < 3 GB.

Memory accounting. A sampler thread walks the driver and all its descendants (Ray's gcs_server,
raylet, and the worker/actor processes the raylet forks) every 0.2 s:
- "peak RSS" is the largest sum of resident set sizes. RSS counts every page a process has
  mapped, including Ray's object store (a shared-memory mapping that the raylet and every worker
  reading or writing blocks touch) and shared library pages, so shared pages are counted once per
  process that maps them: an upper bound on physical memory.
- "peak PSS" (sampled every second) divides each shared page among the processes that map it,
  so its sum counts object-store and library pages once: the physical memory the tree uses.
- "object store" is the plasma store's own figure of bytes in use (sampled every second from
  the raylet); those bytes are included in both sums above (in RSS possibly several times).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

HISTORIES = [
    "Low back pain radiating to the {side} leg for {n} months. Failed conservative management.",
    "Known {cancer} cancer. New thoracolumbar pain. ?metastatic disease.",
    "Bilateral leg pain and numbness on walking, relieved by sitting. ?spinal stenosis.",
    "Fall from standing height. Point tenderness over the upper lumbar spine.",
    "Urinary retention and reduced perineal sensation for {n} days. ?cauda equina syndrome.",
    "Follow-up {n} months after {level} decompression. Recurrent {side} sided symptoms.",
]
TECHNIQUES = [
    "Sagittal T1, T2 and STIR; axial T2 from L2 to S1.",
    "Sagittal T1 and T2, axial T2 through the lower three lumbar levels. No contrast given.",
    "Whole spine sagittal T1 and STIR, axial T2 through abnormal levels; post-contrast T1 fat sat.",
]
COMPARISONS = ["None.", "MRI lumbar spine {n} months ago.", "Radiographs from last week."]
FINDING_SENTENCES = [
    "Normal lumbar lordosis and vertebral body alignment.",
    "Vertebral body heights are maintained without fracture.",
    "The conus medullaris terminates normally at {upper} with normal signal.",
    "At {level} there is a broad-based disc bulge with facet joint hypertrophy causing {grade} "
    "central canal stenosis.",
    "At {level} a {side} paracentral disc protrusion contacts the traversing {side} nerve root.",
    "A {side} foraminal disc extrusion at {level} narrows the exit foramen; the canal is patent.",
    "Ligamentum flavum thickening at {level} contributes to {grade} narrowing of the canal.",
    "There are T1 hypointense, STIR hyperintense lesions in {body} and {body2} in keeping with "
    "metastases.",
    "A typical haemangioma is noted in the {body} vertebral body.",
    "Diffuse heterogeneous marrow signal raises the possibility of an infiltrative process.",
    "Modic type {n} endplate changes are present at {level}.",
    "No epidural collection or abnormal enhancement.",
    "The paravertebral soft tissues are unremarkable.",
    "Mild degenerative disc desiccation from {upper} to {level} without significant stenosis.",
    "An acute wedge compression fracture of {body} shows {n}0% anterior height loss.",
]
IMPRESSIONS = [
    "{grade} central canal stenosis at {level}.",
    "Multilevel degenerative change without high-grade stenosis.",
    "Vertebral metastases at {body} and {body2}; no cord compression.",
    "{side} {level} disc protrusion with nerve root contact.",
    "No acute abnormality. Benign haemangioma.",
    "Acute osteoporotic compression fracture of {body}.",
]
LEVELS = ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
BODIES = ["T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]


def synthetic_report(rng: random.Random) -> str:
    def fill(s: str) -> str:
        return s.format(
            side=rng.choice(["left", "right"]), n=rng.randint(2, 9), level=rng.choice(LEVELS),
            upper=rng.choice(["T12-L1", "L1"]), grade=rng.choice(["mild", "moderate", "severe"]),
            body=rng.choice(BODIES), body2=rng.choice(BODIES),
            cancer=rng.choice(["breast", "prostate", "lung", "renal"]),
        )

    while True:
        findings = " ".join(fill(s) for s in rng.sample(FINDING_SENTENCES, rng.randint(4, 7)))
        text = (f"CLINICAL HISTORY: {fill(rng.choice(HISTORIES))}\n"
                f"TECHNIQUE: {rng.choice(TECHNIQUES)}\n"
                f"COMPARISON: {fill(rng.choice(COMPARISONS))}\n"
                f"FINDINGS: {findings}\n"
                f"IMPRESSION: {fill(rng.choice(IMPRESSIONS))}")
        if 600 <= len(text) <= 900:
            return text


def write_reports(path: Path, rows: int, seed: int = 0) -> tuple[int, int, float]:
    """Write the reports; return the shortest, longest and mean length."""
    rng = random.Random(seed)
    ids = [f"acc-{i:07d}" for i in range(rows)]
    texts = [synthetic_report(rng) for _ in range(rows)]
    pq.write_table(pa.table({"report_id": ids, "text": texts}), path, row_group_size=20_000)
    lengths = [len(t) for t in texts]
    return min(lengths), max(lengths), sum(lengths) / rows


class TreeMemorySampler(threading.Thread):
    """Peak summed RSS (every `every` s) and PSS (every 1 s) of this process and its
    descendants, and peak object-store bytes in use."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.root = every, psutil.Process()
        self.peak_rss = self.peak_pss = self.peak_store = 0
        self.at_peak: list[tuple[int, int, str]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        last_slow = 0.0
        while not self.stop_event.is_set():
            procs = _tree(self.root)
            rss = _sum(procs, lambda p: p.memory_info().rss)
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak = rss, _breakdown(procs)
            if time.monotonic() - last_slow >= 1.0:
                last_slow = time.monotonic()
                self.peak_pss = max(self.peak_pss, _sum(procs, lambda p: p.memory_full_info().pss))
                self.peak_store = max(self.peak_store, _object_store_bytes())
            self.stop_event.wait(self.every)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def _tree(root: psutil.Process) -> list[psutil.Process]:
    """The root and its descendants, less any child caught between fork and exec (a worker
    running `git` for the code version): it shares all its parent's pages copy-on-write and
    would count the parent's memory twice."""
    procs = [root, *root.children(recursive=True)]
    kept = []
    for p in procs:
        try:
            parent = p.parent()
            if parent is not None and p is not root and p.cmdline() == parent.cmdline():
                continue
        except (psutil.Error, OSError):
            continue
        kept.append(p)
    return kept


def _sum(procs, measure) -> int:
    total = 0
    for p in procs:
        try:
            total += measure(p)
        except (psutil.Error, OSError):
            pass  # a worker that exited between the listing and the reading
    return total


def _breakdown(procs) -> list[tuple[int, int, str]]:
    rows = []
    for p in procs:
        try:
            m = p.memory_info()  # shared: file-backed + shared-memory (object store) pages
            rows.append((m.rss, m.shared, " ".join(p.cmdline())[:70] or p.name()))
        except (psutil.Error, OSError):
            pass
    return sorted(rows, reverse=True)


def _object_store_bytes() -> int:
    try:
        import ray
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        if not ray.is_initialized():
            return 0
        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - an internal API: the figure is a courtesy
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=125_000)
    parser.add_argument("--reports-per-batch", type=int, default=4000)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--max-actors", type=int, default=None)
    parser.add_argument("--show-processes", action="store_true",
                        help="print each process's RSS at the peak")
    parser.add_argument("--keep", help="write the input and output here instead of a temp folder")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING)

    import ray

    from ray_app.engines import EngineConfig
    from ray_app.pipeline.label_job import LabelJobConfig, run_label_job

    with tempfile.TemporaryDirectory(prefix="bench-data-plane-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        reports = folder / "reports.parquet"
        started = time.monotonic()
        # In a child process, so that the generator's memory is not counted as the job's.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            low, high, mean = pool.submit(write_reports, reports, args.rows).result()
        print(f"generated {args.rows} reports ({low}-{high} characters, mean {mean:.0f}) in "
              f"{time.monotonic() - started:.1f} s")

        sampler = TreeMemorySampler()
        sampler.start()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = LabelJobConfig(
            input=str(reports), output=str(folder / "out"), conditions=["spinal_cancer"],
            engine=EngineConfig(engine="dry-run"), reports_per_batch=args.reports_per_batch,
            cpus_per_actor=args.cpus_per_actor, max_actors=args.max_actors,
        )
        summary = run_label_job(cfg)
        sampler.stop()
        ray.shutdown()

    assert summary.label_rows == args.rows and summary.error_rows == 0, summary
    rate = summary.input_rows / summary.seconds
    print(f"rows {summary.input_rows}, seconds {summary.seconds:.1f} (job only; Ray start "
          f"excluded), {rate:.0f} reports/s")
    print(f"peak memory of the process tree: RSS {sampler.peak_rss / 1e9:.2f} GB (shared pages "
          f"counted per process), PSS {sampler.peak_pss / 1e9:.2f} GB (each page once); "
          f"object store in use at peak {sampler.peak_store / 1e9:.2f} GB")
    if args.show_processes:
        print("processes at the RSS peak:")
        for rss, shared, name in sampler.at_peak:
            print(f"  {rss / 1e6:7.0f} MB (of which shared {shared / 1e6:5.0f} MB)  {name}")
    print(f"data plane: {summary.input_rows} reports in {summary.seconds:.1f} s = {rate:.0f} "
          f"reports/s, peak RSS {sampler.peak_rss / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
