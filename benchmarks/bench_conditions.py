"""Cost of labelling k conditions per report: the paper's wording, report-first and
definitions-first, in one run.

The paper's wording names the condition in the system message, before the report, so no two
conditions of a report share a prefix and k conditions cost k full prompts. The `report_first`
variant puts the role and the report first and the definition and question after, so the
transformers engine computes everything up to the report once per report and runs each
condition's definition and question on a copy of its KV cache. The `definitions_first` variant
puts the definitions of all k conditions before the report: that preamble runs once per run,
and a report's questions (a short question each) run packed into one row after the report,
kept apart by the attention mask.

    python benchmarks/bench_conditions.py --model smollm2-135m-instruct --reports 24
    python benchmarks/bench_conditions.py --model qwen2.5-coder-1.5b-instruct --dtype bfloat16 \
        --reports 6

On a GPU machine that cannot hold the weights, the same architecture with random weights times
the same work (scores meaningless; benchmarks/random_weights.py):

    python benchmarks/random_weights.py --like qwen-arch --out /tmp/qwen-random --weights
    python benchmarks/bench_conditions.py --model /tmp/qwen-random --dtype bfloat16 \
        --reports 256 --batch-size 64 --repeats 2

A model with the real tokenizer and almost no compute (random_weights.py --layers 2 --hidden
128) shows the engine's own work, which a GPU does not speed up: the column "s/report outside
passes" is the time not spent in forward passes, on any model.

    python benchmarks/bench_conditions.py --model /tmp/qwen-tiny --dtype bfloat16 \
        --reports 256 --batch-size 64 --repeats 2 --before 24f0512

`--before REV` runs that revision's engine (its scoring methods, tensor helpers and prompt
formatter) on the same loaded model, rounds interleaved, and prints how much faster this
checkout is and the largest score difference.

Same engine (one loaded model), same reports, direct method; k = 1, 4 and 9 chest conditions
(the 5 built-in chest YAMLs and 4 more written here). Reports: the Open-i development CSV
(`../shared/data/openi/reports_dev.csv`, findings + impression) when present, else the package's
sample spine reports. Prints seconds per report, the ratio to k = 1 for each wording, the tokens
each forward pass computed per report, the time spent in passes of shared-prefix groups and of
single prompts, and the number of forward passes.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ray_app.engines import EngineConfig
from ray_app.engines.base import ChatFormatter
from ray_app.engines.transformers_engine import (
    TransformersEngine,
    _common_prefix_len,
    first_messages,
    shared_prefix_groups,
)
from ray_app.labelling.conditions import UNITS, load_conditions, with_unit
from ray_app.labelling.labeller import Labeller, ReportTask
from ray_app.labelling.prompts import BUILTIN_TEMPLATES, PromptTemplate
from ray_app.pipeline.embedded_default import sample_file

log = logging.getLogger("bench_conditions")

OPENI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "openi" / "reports_dev.csv"
CHEST = ["atelectasis", "cardiomegaly", "fracture", "pleural_effusion", "pneumothorax"]
# Four more chest findings, written the way the built-in specs are (one sentence, what counts
# and what does not), as user YAML files.
EXTRA = {
    "pneumonia": "Pneumonia is an infection of the lung seen as airspace opacity or "
                 "consolidation attributed to infection, including a suspected or developing "
                 "pneumonia; atelectasis or scarring alone does not count.",
    "pulmonary_edema": "Pulmonary edema is fluid in the lung interstitium or airspaces, including "
                       "interstitial edema, vascular congestion with Kerley lines and alveolar "
                       "edema; vascular prominence alone does not count.",
    "lung_nodule": "A lung nodule is a rounded opacity in the lung of up to 3 cm, solid or "
                   "subsolid, including a calcified granuloma; a nipple shadow or an opacity "
                   "explained as overlying tissue does not count.",
    "emphysema": "Emphysema is destruction of alveolar walls with hyperinflated lungs, including "
                 "flattened hemidiaphragms described as chronic obstructive pulmonary disease; "
                 "a low lung volume or normal inflation does not count.",
}
KS = (1, 4, 9)
WORDINGS = ("paper", "report_first", "definitions_first")


def write_extra_conditions(folder: Path) -> list[str]:
    paths = []
    for name, definition in EXTRA.items():
        path = folder / f"{name}.yaml"
        path.write_text(f"name: {name}\ndefinition: >-\n  {definition}\ndrop_sections: [history]\n")
        paths.append(str(path))
    return paths


def load_reports(n: int, seed: int, data: Path) -> tuple[list[ReportTask], str]:
    if data.is_file():
        frame = pd.read_csv(data, dtype=str).fillna("")
        empty = (frame["findings"].str.strip() == "") & (frame["impression"].str.strip() == "")
        frame = frame[~empty]
        frame = frame.sample(n=min(n, len(frame)), random_state=seed)
        texts = [f"FINDINGS: {f}\nIMPRESSION: {i}"
                 for f, i in zip(frame["findings"], frame["impression"])]
        return [ReportTask(f"openi-{uid}", t) for uid, t in zip(frame["uid"], texts)], str(data)
    texts = pd.read_csv(sample_file("spine_reports.csv"), dtype=str)["text"].tolist()
    picked = pd.Series(texts).sample(n=n, replace=n > len(texts), random_state=seed).tolist()
    return [ReportTask(f"r{i}", t) for i, t in enumerate(picked)], "sample spine reports"


@dataclass
class Timers:
    """Seconds spent per scoring path and forward passes, counted around the engine's methods."""

    seconds: dict[str, float] = field(default_factory=lambda: {"plain": 0.0, "shared": 0.0})
    passes: int = 0  # forward passes: on a GPU each costs about the same, whatever its tokens
    # Seconds inside them; the rest is the engine's own work (templates, tokenizing, packing,
    # masks), which a GPU does not speed up. (On a GPU a pass returns before its kernels end:
    # there the split is only meaningful with the model's work small.)
    forward_s: float = 0.0

    def wrap(self, engine: TransformersEngine) -> None:
        """Time the engine's current scoring methods (again after they were swapped)."""
        for method, key in (("_score_padded", "plain"), ("_score_packed", "shared"),
                            ("_score_on_copies", "shared"), ("_score_shared", "shared")):
            if not hasattr(engine, method):  # an earlier engine's (--before) names differ
                continue
            setattr(engine, method, self._timed(getattr(engine, method), key))

    def count_passes(self, engine: TransformersEngine) -> None:
        forward = engine._forward

        def counted(*args, **kwargs):
            self.passes += 1
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.forward_s += time.perf_counter() - start
        engine._forward = counted

    def _timed(self, fn, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return run

    def reset(self) -> None:
        for key in self.seconds:
            self.seconds[key] = 0.0
        self.passes, self.forward_s = 0, 0.0


# Methods of an earlier engine that are not swapped in with --before: loading, and the pass
# itself (counted here).
KEPT_METHODS = {"__init__", "_load_model", "_load_tokenizer", "_forward", "close"}


@dataclass
class EngineVersion:
    """An engine's methods bound to the loaded engine, and its prompt formatter."""

    methods: dict
    formatter: object
    # Attributes its methods keep state in that this checkout's engine does not create (the
    # earlier engine's __init__ is not run: it would load the model again).
    state: dict = field(default_factory=dict)


def engine_version(engine: TransformersEngine, before: str | None) -> EngineVersion:
    """This checkout's engine (None) or an earlier one on the same loaded model. `before`: a git
    revision (its transformers_engine.py, the tensor helpers it imports and its ChatFormatter)
    or an engine file (with this checkout's helpers and formatter)."""
    cls, formatter = TransformersEngine, engine.formatter
    if before and Path(before).is_file():
        cls = _load_module("engine_before", Path(before).read_text()).TransformersEngine
    elif before:
        cls, formatter = _engine_at(before, engine)
    methods = {name: types.MethodType(fn, engine) for name, fn in vars(cls).items()
               if inspect.isfunction(fn) and name not in KEPT_METHODS}
    # Before 2026-12-07 the engine kept its preambles' tokens itself.
    state = {"_preamble_tokens": {}} if before else {}
    return EngineVersion(methods, formatter, state)


def _engine_at(revision: str, engine: TransformersEngine):
    def source(path):
        return subprocess.run(["git", "show", f"{revision}:{path}"], check=True, text=True,
                              capture_output=True, cwd=Path(__file__).resolve().parents[1]).stdout
    base = _load_module("base_before", source("ray_app/engines/base.py"))
    helpers = _load_module("tensors_before", source("ray_app/engines/tensors.py"))
    current = sys.modules["ray_app.engines.tensors"]
    sys.modules["ray_app.engines.tensors"] = helpers  # what the earlier engine imports
    try:
        module = _load_module("engine_before", source("ray_app/engines/transformers_engine.py"))
    finally:
        sys.modules["ray_app.engines.tensors"] = current
    return module.TransformersEngine, base.ChatFormatter(engine.tokenizer)


def _load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module  # its dataclasses look their module up there
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def use_version(engine: TransformersEngine, version: EngineVersion, timers: Timers,
                swapped: set[str]) -> None:
    """Run `version` (and the class's own methods where it has none); `swapped`: every name
    any version sets on the engine."""
    for name in swapped:
        vars(engine).pop(name, None)
    for name, method in version.methods.items():
        setattr(engine, name, method)
    engine.formatter = version.formatter
    for name, value in version.state.items():
        setattr(engine, name, value)
    timers.wrap(engine)


def computed_tokens(engine: TransformersEngine, labeller: Labeller,
                    tasks: list[ReportTask]) -> tuple[int, int, int, int]:
    """(prompt tokens, tokens the engine runs, of them in shared prefixes, of them in
    preambles) for these tasks, grouped as the engine groups them; a preamble runs once."""
    conversations = labeller.engine_prompts(tasks)
    texts = [engine.formatter.render(c) for c in conversations]
    encoded = [engine.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    # This checkout's preamble rule, whichever engine's methods and formatter are swapped in.
    swapped, engine.formatter = engine.formatter, ChatFormatter(engine.tokenizer)
    try:
        heads = [engine.formatter.preamble_head(c, t) for c, t in zip(conversations, texts)]
        preambles = [TransformersEngine._preamble(engine, h, e) for h, e in zip(heads, encoded)]
    finally:
        engine.formatter = swapped
    total = sum(len(e) for e in encoded)
    run = prefix = 0
    groups = shared_prefix_groups(encoded, engine.config.min_shared_prefix,
                                  first_messages(conversations))
    for group in groups:
        rows = [encoded[i] for i in group]
        skip = len(preambles[group[0]])
        shared = skip
        if len(group) > 1:
            shared = max(skip, min(_common_prefix_len(rows), min(len(r) for r in rows) - 1))
        prefix += shared - skip
        run += shared - skip + sum(len(r) - shared for r in rows)
    once = sum(len(p) for p in set(preambles))
    return total, run + once, prefix, once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reports", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=EngineConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="time every cell this often, rounds interleaved, and keep the "
                             "fastest (a shared machine's noise only ever adds time)")
    parser.add_argument("--data", default=str(OPENI), help="Open-i reports_dev.csv")
    parser.add_argument("--wordings", nargs="+", choices=WORDINGS, default=list(WORDINGS))
    parser.add_argument("--unit", choices=UNITS, default="report",
                        help="ask every condition about the whole report (the figures before "
                             "2026-12-07) or about each sentence (the chest conditions' own)")
    parser.add_argument("--before", default=None,
                        help="a git revision (or an earlier ray_app/engines/transformers_engine.py "
                             "file): its engine's methods are timed too, on the same model, "
                             "rounds interleaved")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores); on a shared machine 1 thread "
                             "makes the CPU seconds a steady measure of the work")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    engine = TransformersEngine(EngineConfig(model=args.model, dtype=args.dtype,
                                             batch_size=args.batch_size,
                                             cpu_threads=args.threads))
    timers = Timers()
    timers.count_passes(engine)
    engines = {"now": engine_version(engine, None)}
    if args.before:
        engines = {"before": engine_version(engine, args.before), **engines}
    swapped = set().union(*(version.methods for version in engines.values()))
    tasks, source = load_reports(args.reports, args.seed, Path(args.data))
    with tempfile.TemporaryDirectory() as folder:
        conditions = [with_unit(c, args.unit)
                      for c in load_conditions([*CHEST, *write_extra_conditions(Path(folder))])]
    templates: dict[str, PromptTemplate] = {w: BUILTIN_TEMPLATES[w] for w in args.wordings}

    # Warm-up: every wording once on two reports (allocator, kernels, lazy imports), and every
    # cell on one, so that a preamble (definitions_first: the definitions of the cell's k
    # conditions) is computed before the clock starts, as it is once per run of an archive.
    for version in engines.values():
        use_version(engine, version, timers, swapped)
        for template in templates.values():
            Labeller(engine, conditions, "direct", template).label(tasks[:2])
            for k in KS:
                Labeller(engine, conditions[:k], "direct", template).label(tasks[:1])

    results: dict[tuple[str, str, int], dict[str, float]] = {}
    scores: dict[tuple[str, str, int], list[float]] = {}
    n = len(tasks)
    for round_ in range(args.repeats):
        for k in KS:
            for wording, template in templates.items():
                for version, engine_code in engines.items():
                    use_version(engine, engine_code, timers, swapped)
                    labeller = Labeller(engine, conditions[:k], "direct", template)
                    timers.reset()
                    # Every prompt is new to a run: no render kept from an earlier round, nor
                    # any tokenizer check of what follows a preamble (ChatFormatter.
                    # encode_prompts), as in a run's first reports; a run keeps its preambles'
                    # tokens and KV, computed in the warm-up here.
                    for kept in ("_rendered", "_splits"):
                        getattr(engine.formatter, kept, {}).clear()
                    start, cpu_start = time.perf_counter(), time.process_time()
                    rows = labeller.label(tasks)
                    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                    log.info("round %d, %s %s k=%d: %.4f s/report (%d scores)", round_ + 1,
                             version, wording, k, seconds / n, len(rows))
                    key = (version, wording, k)
                    scores[key] = [row["score"] for row in rows]
                    if key in results and results[key]["s"] <= seconds / n:
                        continue
                    total, run, prefix, once = computed_tokens(engine, labeller, tasks)
                    results[key] = dict(
                        s=seconds / n, cpu=cpu / n, total=total / n, run=(run - once) / n,
                        prefix=prefix / n, preamble=once,
                        shared_s=timers.seconds["shared"] / n,
                        plain_s=timers.seconds["plain"] / n, passes=timers.passes,
                        outside=(seconds - timers.forward_s) / n,
                    )

    print(f"\nconditions benchmark: {args.model}, {args.dtype}, {len(tasks)} reports ({source}), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, direct method, fastest "
          f"of {args.repeats} round(s)")
    print(f"conditions: {', '.join(c.name for c in conditions)} (k = first k), each asked "
          f"about {'each sentence' if args.unit == 'sentence' else 'the whole report'}")
    if args.before:
        print(f"engine: 'before' runs the scoring methods of {args.before}, 'now' this "
              "checkout's, on the same loaded model, interleaved")
    print("\n| engine | wording | k | s/report | x k=1 | CPU s/report | x k=1 | "
          "prompt tokens/report | tokens run/report | of them shared prefix | "
          "preamble tokens (once a run) | "
          "s shared-prefix passes | s unshared passes | forward passes | "
          "s/report outside passes | x k=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for version in engines:
        for wording in args.wordings:
            for k in KS:
                r, base = results[version, wording, k], results[version, wording, 1]
                # four decimals: on a GPU a report takes milliseconds
                print(f"| {version} | {wording} | {k} | {r['s']:.4f} | {r['s'] / base['s']:.2f}x | "
                      f"{r['cpu']:.4f} | {r['cpu'] / base['cpu']:.2f}x | "
                      f"{r['total']:.0f} | {r['run']:.0f} | {r['prefix']:.0f} | {r['preamble']} | "
                      f"{r['shared_s']:.4f} | {r['plain_s']:.4f} | {r['passes']} | "
                      f"{r['outside']:.4f} | {r['outside'] / base['outside']:.2f}x |")
    for version in engines:
        for wording in args.wordings:
            nine, one = results[version, wording, 9], results[version, wording, 1]
            ratio, cpu_ratio = nine["s"] / one["s"], nine["cpu"] / one["cpu"]
            print(f"{version} {wording}: 9 conditions cost {ratio:.2f}x one (CPU time "
                  f"{cpu_ratio:.2f}x, tokens run {nine['run'] / one['run']:.2f}x, forward passes "
                  f"{nine['passes'] / one['passes']:.2f}x, outside passes "
                  f"{nine['outside'] / one['outside']:.2f}x); target <= 3x "
                  f"{'met' if ratio <= 3 else 'NOT met'}")
    if args.before:
        for wording in args.wordings:
            for k in KS:
                before, now = scores["before", wording, k], scores["now", wording, k]
                gap = max(abs(a - b) for a, b in zip(before, now))
                speedup = results["before", wording, k]["s"] / results["now", wording, k]["s"]
                print(f"{wording} k={k}: now {speedup:.2f}x as fast as before; largest score "
                      f"difference {gap:.1e}")

if __name__ == "__main__":
    main()
