"""From a config dataclass to a job's command line (ray_app/pipeline/config_cli.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from ray_app.pipeline.cli import InputError
from ray_app.pipeline.config_cli import (
    config_from_args,
    config_parser,
    flag_names,
    from_mapping,
)


@dataclass
class Inner:
    RETIRED_SETTINGS: ClassVar[dict[str, str]] = {"old_knob": "it never changed anything"}

    name: str = field(default="tiny", metadata={"doc": "Model name."})
    size: int = field(default=8, metadata={"doc": "Rows per pass."})
    rate: float = field(default=1.0, metadata={"doc": "A rate, 100% by default."})
    fast: bool = field(default=True, metadata={"doc": "Go fast."})
    limit: int | None = field(default=None, metadata={"doc": "Inner limit."})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"doc": "Backend kwargs."})


@dataclass
class Job:
    source: str = field(metadata={"doc": "Where the reports are."})
    names: list[str] = field(metadata={"doc": "Conditions."})
    inner: Inner = field(default_factory=Inner, metadata={"doc": "Engine-like settings."})
    limit: int | None = field(default=None, metadata={"doc": "Only the first N rows."})
    shape: tuple[int, int] = field(default=(2, 3), metadata={"doc": "Height and width."})
    verbose: bool = field(default=False, metadata={"doc": "Say more."})
    ratio: float = field(default=0.5, metadata={"doc": "A fraction."})


def parse(argv: list[str]) -> Job:
    return config_from_args(Job, config_parser(Job, "test job").parse_args(argv))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


def test_flags_come_from_the_fields_nested_ones_by_their_own_name():
    names = flag_names(Job)
    assert names["source"] == "--source" and names["inner.size"] == "--size"
    assert names["limit"] == "--limit" and names["inner.limit"] == "--inner-limit"  # taken
    cfg = parse(["--source", "a.csv", "--names", "x", "y", "--size", "4", "--inner-limit", "7",
                 "--shape", "5", "6", "--verbose", "--no-fast", "--rate", "2"])
    assert cfg == Job(source="a.csv", names=["x", "y"], shape=(5, 6), verbose=True,
                      inner=Inner(size=4, limit=7, fast=False, rate=2.0))
    assert isinstance(cfg.inner.rate, float)


def test_precedence_defaults_yaml_flags_set(tmp_path):
    config = write(tmp_path, "source: from_yaml.csv\nnames: [a]\nratio: 0.1\nlimit: 5\n"
                             "inner: {size: 16, name: yaml_model}\n")
    cfg = parse(["--config", config, "--limit", "6", "--size", "32",
                 "--set", "limit=7", "inner.extra={k: 1}", "--set", "inner.name=set_model"])
    assert (cfg.source, cfg.names, cfg.ratio) == ("from_yaml.csv", ["a"], 0.1)  # YAML
    assert cfg.inner.size == 32  # a flag over the YAML
    assert cfg.limit == 7 and cfg.inner.name == "set_model"  # --set over flag and YAML
    assert cfg.inner.extra == {"k": 1} and cfg.inner.rate == 1.0  # --set only; a default
    assert cfg.verbose is False and cfg.shape == (2, 3)


def test_unknown_yaml_key_names_the_key_the_file_and_the_known_keys(tmp_path):
    config = write(tmp_path, "source: a\nnames: [a]\ninner:\n  sise: 3\n")
    with pytest.raises(InputError) as err:
        parse(["--config", config])
    assert str(err.value) == (f"{config}: unknown field 'inner.sise'; known under 'inner': "
                              "['extra', 'fast', 'limit', 'name', 'rate', 'size']")
    top = write(tmp_path, "sourse: a\n")
    with pytest.raises(InputError, match=r"unknown field 'sourse'; known: \['inner', 'limit'"):
        parse(["--config", top])


def test_unknown_set_key_and_malformed_set_are_refused():
    with pytest.raises(InputError, match=r"^--set: unknown field 'inner\.nmae'; known under"):
        parse(["--source", "a", "--names", "x", "--set", "inner.nmae=m"])
    with pytest.raises(InputError, match=r"--set 'inner\.name': expected KEY=VALUE"):
        parse(["--source", "a", "--names", "x", "--set", "inner.name"])


def test_values_of_the_wrong_type_name_the_key_and_where_they_came_from(tmp_path):
    config = write(tmp_path, "source: a\nnames: [x]\ninner: {size: many}\n")
    with pytest.raises(InputError, match=f"{config}: inner.size must be an integer, got 'many'"):
        parse(["--config", config])
    with pytest.raises(InputError, match="--set: verbose must be true or false, got 'loud'"):
        parse(["--source", "a", "--names", "x", "--set", "verbose=loud"])
    with pytest.raises(InputError, match="shape must be 2 values, got 3"):
        parse(["--source", "a", "--names", "x", "--set", "shape=[1, 2, 3]"])
    with pytest.raises(InputError, match="must be a mapping of Inner settings"):
        parse(["--config", write(tmp_path, "inner: 3\n")])
    # YAML 1.1 reads 3e-4 (no dot) as text: a float field takes it as the number it is
    assert parse(["--source", "a", "--names", "x", "--set", "ratio=3e-4"]).ratio == 3e-4


def test_missing_required_fields_are_named_by_their_flags(tmp_path):
    with pytest.raises(SystemExit, match=r"^missing --source, --names: give them as flags"):
        parse([])
    with pytest.raises(SystemExit, match="missing --names"):  # an empty list is nothing
        parse(["--config", write(tmp_path, "source: a\nnames: []\n")])


def test_retired_settings_still_load_with_a_warning(tmp_path, caplog):
    config = write(tmp_path, "source: a\nnames: [x]\ninner: {old_knob: 8}\n")
    with caplog.at_level(logging.WARNING):
        assert parse(["--config", config, "--old-knob", "4"]) == Job(source="a", names=["x"])
    assert "'inner.old_knob' is no longer a setting and is ignored" in caplog.text
    assert f"{config}:" in caplog.text and "the command line:" in caplog.text


def test_help_shows_docs_and_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        config_parser(Job, "test job").parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "--size SIZE Rows per pass. (default: 8)" in out
    assert "A rate, 100% by default. (default: 1.0)" in out  # a % in a doc does not break it
    assert "--fast, --no-fast Go fast. (default: True)" in out
    assert "--source SOURCE Where the reports are. (required)" in out
    assert "--set KEY=VALUE only: inner.extra: Backend kwargs." in out  # a dict: no flag
    assert "--old-knob" not in out


def test_from_mapping_checks_like_the_command_line():
    cfg = from_mapping(Job, {"source": "a", "names": "x", "inner": {"rate": "1e-3"}}, "stored")
    assert cfg.names == ["x"] and cfg.inner.rate == 1e-3
    with pytest.raises(InputError, match=r"stored: missing field\(s\) \['names'\]"):
        from_mapping(Job, {"source": "a"}, "stored")


def test_a_field_named_like_the_mechanisms_own_flags_is_refused():
    @dataclass
    class Clash:
        config: str = "x"

    with pytest.raises(TypeError, match="rename the field"):
        config_parser(Clash, "clash")


# ------------------------------------------------------------- the label job's command line

OLD_LABEL_FLAGS = [  # what jobs/label_reports.py took before config_cli, and the value each set
    ("--input", "r.csv", "input", "r.csv"), ("--output", "o", "output", "o"),
    ("--method", "summary", "method", "summary"), ("--id-column", "acc", "id_column", "acc"),
    ("--text-column", "t", "text_column", "t"), ("--input-format", "csv", "input_format", "csv"),
    ("--encoding", "cp1252", "encoding", "cp1252"), ("--calibration", "c.json", "calibration",
                                                     "c.json"),
    ("--prompt", "p.yaml", "prompt", "p.yaml"), ("--prompt-name", "v2", "prompt_name", "v2"),
    ("--reports-per-batch", "4", "reports_per_batch", 4), ("--min-actors", "2", "min_actors", 2),
    ("--max-actors", "3", "max_actors", 3), ("--cpus-per-actor", "0.5", "cpus_per_actor", 0.5),
    ("--engine-restarts", "1", "engine_restarts", 1), ("--limit", "10", "limit", 10),
    ("--s3-endpoint", "http://h:9000", "s3_endpoint", "http://h:9000"),
    ("--progress-every-s", "5", "progress_every_s", 5.0),
    ("--engine", "vllm", "engine.engine", "vllm"), ("--model", "m", "engine.model", "m"),
    ("--dtype", "float32", "engine.dtype", "float32"), ("--device", "cpu", "engine.device", "cpu"),
    ("--batch-size", "16", "engine.batch_size", 16),
    ("--generate-batch-size", "8", "engine.generate_batch_size", 8),
    ("--max-context-tokens", "2048", "engine.max_context_tokens", 2048),
    ("--max-new-tokens", "64", "engine.max_new_tokens", 64),
    ("--repetition-penalty", "1.15", "engine.repetition_penalty", 1.15),
    ("--cpu-threads", "2", "engine.cpu_threads", 2), ("--adapter", "lora/", "engine.adapter",
                                                      "lora/"),
    ("--tensor-parallel-size", "2", "engine.tensor_parallel_size", 2),
]


def label_config(argv):
    from ray_app.pipeline.label_job import LabelJobConfig

    return config_from_args(LabelJobConfig, config_parser(LabelJobConfig, "label").parse_args(argv))


def value_at(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_flag_the_label_job_took_still_sets_its_field():
    argv = [x for flag, text, _, _ in OLD_LABEL_FLAGS for x in (flag, text)]
    cfg = label_config([*argv, "--conditions", "fracture", "spinal_cancer"])
    assert cfg.conditions == ["fracture", "spinal_cancer"]
    for flag, _, key, expected in OLD_LABEL_FLAGS:
        assert value_at(cfg, key) == expected, flag


def test_the_label_job_still_takes_draft_tokens_and_ignores_it(tmp_path, caplog):
    config = write(tmp_path, "input: r.csv\noutput: o\nconditions: [fracture]\n"
                             "engine: {model: m, draft_tokens: 8}\n")
    with caplog.at_level(logging.WARNING):
        cfg = label_config(["--config", config, "--draft-tokens", "4"])
    assert cfg.engine.model == "m" and "'engine.draft_tokens' is no longer" in caplog.text
    with pytest.raises(SystemExit, match="^missing --input, --output, --conditions"):
        label_config(["--model", "m"])
