"""Preparing a call's prompts for the vLLM engine: the earlier way (each prompt rendered and
tokenized alone, its definitions-first preamble with it) against ChatFormatter.prompt_ids (one
tokenizer call, each preamble tokenized once per run), on the same definitions-first prompts;
rounds interleaved, the fastest kept, and the token ids checked equal.

    python benchmarks/bench_prompt_ids.py --model qwen2.5-coder-1.5b-instruct --reports 256
    python benchmarks/bench_prompt_ids.py --unit sentence   # a prompt per sentence and condition

On a GPU vLLM's own scheduling and passes take milliseconds a report, so this is part of what
a report costs there; the tokenizer only is loaded here, not the model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_conditions import CHEST, OPENI, load_reports, write_extra_conditions
from transformers import AutoTokenizer

from ray_app.engines.base import ChatFormatter
from ray_app.engines.model_sources import resolve_model
from ray_app.labelling.conditions import load_conditions
from ray_app.labelling.prompts import BUILTIN_TEMPLATES, bind_conditions, direct_conversation
from ray_app.labelling.sections import split_sentences


def one_by_one(formatter: ChatFormatter, conversations) -> list[list[int]]:
    """What the vLLM engine did before 2026-12-07 (ChatFormatter.token_ids, without the kept
    renders)."""
    template = formatter.tokenizer.apply_chat_template
    return [formatter.encode([template(c, tokenize=False, add_generation_prompt=True)])[0]
            for c in conversations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--reports", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--unit", choices=("report", "sentence"), default="report",
                        help="ask about whole reports, or about each sentence of each report "
                             "(the chest conditions' own unit)")
    args = parser.parse_args()

    where = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(where.folder, gguf_file=where.gguf_file)
    tasks, source = load_reports(args.reports, 0, OPENI)
    with tempfile.TemporaryDirectory() as folder:
        conditions = load_conditions([*CHEST, *write_extra_conditions(Path(folder))])
    template = bind_conditions(BUILTIN_TEMPLATES["definitions_first"], conditions)
    texts = [t.text for t in tasks]
    if args.unit == "sentence":
        texts = [s for text in texts for s in split_sentences(text)]
    conversations = [direct_conversation(template, c, text) for text in texts for c in conditions]
    ways = {"one by one": one_by_one, "prompt_ids": ChatFormatter.prompt_ids}
    best = dict.fromkeys(ways, float("inf"))
    ids = {}
    for _ in range(args.repeats):
        for name, way in ways.items():
            formatter = ChatFormatter(tokenizer)  # nothing kept from an earlier round
            formatter.prompt_ids(conversations[:1])  # a run's first prompt: its preamble split
            start = time.perf_counter()
            ids[name] = way(formatter, conversations)
            best[name] = min(best[name], time.perf_counter() - start)
    assert ids["one by one"] == ids["prompt_ids"], "the two ways gave different token ids"
    n = len(tasks)
    print(f"{len(conversations)} definitions-first prompts ({n} reports from {source}, "
          f"{len(texts)} {args.unit}s, x {len(conditions)} conditions), {args.model} tokenizer, "
          f"fastest of {args.repeats}:")
    for name, seconds in best.items():
        print(f"  {name}: {seconds * 1e3 / n:.2f} ms a report")
    print(f"  prompt_ids {best['one by one'] / best['prompt_ids']:.1f}x as fast; same token ids")


if __name__ == "__main__":
    main()
