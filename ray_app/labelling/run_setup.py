"""A labelling run's setup, built once: everything a score depends on, known before a model loads.

The label job's driver builds it from the job's settings, checks it against the calibration and
the output folder's manifest, and hands it to the engine actors, which only load the engine; the
Serve app builds its labeller from one too. Plain Python, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ray_app.engines import EngineConfig, make_engine
from ray_app.engines.base import model_identity
from ray_app.engines.dry_run import DryRunEngine, dry_run_identity
from ray_app.evaluation.calibration import Calibration, CalibrationError
from ray_app.labelling import few_shot
from ray_app.labelling import rule_baseline as rules
from ray_app.labelling.conditions import Condition, load_conditions, with_unit
from ray_app.labelling.labeller import Labeller
from ray_app.labelling.prompts import (
    BUILTIN_TEMPLATES,
    DEFAULT_TEMPLATE,
    PromptTemplate,
    bind_conditions,
    run_prompt,
)
from ray_app.labelling.score_cache import DEFAULT_ENTRIES, ScoreCache
from ray_app.provenance import ADAPTER_PROVENANCE


@dataclass(frozen=True)
class RunSetup:
    """Conditions (with their few-shot pool bound), method, prompt, engine settings and
    calibration of one labelling run."""

    method: str
    conditions: tuple[Condition, ...]
    engine: EngineConfig
    template: PromptTemplate = DEFAULT_TEMPLATE
    calibration: Calibration | None = None
    pool: few_shot.ExamplePool | None = None

    @classmethod
    def build(cls, *, method: str, conditions: Sequence[str], engine: EngineConfig,
              prompt: str | None = None, prompt_name: str | None = None, unit: str | None = None,
              calibration: str | None = None, few_shot_pool: str | None = None,
              few_shot_truth: str | None = None, id_column: str = "report_id",
              text_column: str = "text", s3_endpoint: str | None = None) -> "RunSetup":
        """Load each piece once: condition YAMLs, prompt variant, calibration file, example pool.
        `unit` ('report' or 'sentence'), when given, replaces every condition's own."""
        loaded = load_conditions(conditions)
        if unit is not None:
            loaded = [with_unit(c, unit) for c in loaded]
        pool = few_shot.pool_for(loaded, method, few_shot_pool, few_shot_truth, id_column,
                                 text_column, s3_endpoint)
        return cls(method=method, conditions=tuple(few_shot.bind_pool(loaded, pool)),
                   engine=engine,
                   template=run_prompt(loaded, prompt, prompt_name),
                   calibration=Calibration.load(calibration) if calibration else None,
                   pool=pool)

    @property
    def uses_rules(self) -> bool:
        return self.method == rules.METHOD

    @property
    def condition_names(self) -> list[str]:
        return [c.name for c in self.conditions]

    @property
    def model(self) -> str | None:
        """The model id every row will carry; None for an engine of your own
        ('package.module:Class'), whose ids are its own business until it loads."""
        if self.uses_rules:
            return rules.rules_model_id()
        if ":" in self.engine.engine:
            return None
        if self.engine.engine == DryRunEngine.name:
            return dry_run_identity(self.engine)
        return model_identity(self.engine)

    @property
    def prompt_hash(self) -> str:
        if self.uses_rules:
            return rules.rules_hash(self.conditions)
        return bind_conditions(self.template, self.conditions).template_hash(self.method)

    def scoring(self) -> dict[str, Any]:
        """Engine settings that move scores without changing the model id: a run resumed with
        another dtype or engine would mix two sets of scores in one table."""
        if self.uses_rules:
            return {}
        return {"engine": self.engine.engine, "dtype": self.engine.dtype}

    def identity(self) -> dict[str, Any]:
        """What the output folder's manifest records, and a resumed run must match."""
        return {
            "model": self.model or model_identity(self.engine),
            "method": self.method,
            "prompt_hash": self.prompt_hash,
            "scoring": self.scoring(),
            "conditions": {c.name: c.definition_hash() for c in self.conditions},
            "calibration_id": self.calibration.calibration_id if self.calibration else None,
            **few_shot.manifest_entry(self.conditions, self.pool),
        }

    def adapter_mismatch(self) -> str | None:
        """How the engine's adapter was trained on another prompt or other definitions than
        this run's (from its training provenance, when the folder is local), or None. An adapter
        learns its prompt: labelled with another, its scores are not the ones it was measured
        with (a chest adapter trained before definitions_first became their default, say)."""
        adapter = None if self.uses_rules else self.engine.adapter
        path = Path(adapter) / ADAPTER_PROVENANCE if adapter else None
        if path is None or not path.is_file():
            return None
        trained = json.loads(path.read_text())
        problems = []
        if trained.get("prompt_hash") not in (None, self.prompt_hash):
            named = [name for name, t in BUILTIN_TEMPLATES.items()
                     if bind_conditions(t, self.conditions).template_hash(self.method)
                     == trained["prompt_hash"]]
            problems.append(f"it was trained on prompt {trained['prompt_hash']}, this run uses "
                            f"{self.prompt_hash}" + (f" (pass --prompt {named[0]})" if named else
                                                     " (pass the --prompt it was trained on)"))
        ours = {c.name: c.definition_hash() for c in self.conditions}
        changed = sorted(name for name, value in (trained.get("definition_hashes") or {}).items()
                         if name in ours and ours[name] != value)
        if changed:
            problems.append(f"the definitions of {changed} changed since it was trained")
        return "; ".join(problems) or None

    def check_calibration(self) -> None:
        """Refuse a calibration made for another model, prompt or definition before any work
        starts; for an engine of your own the labeller checks again once it has loaded."""
        if self.calibration is None:
            return
        if self.uses_rules:
            raise CalibrationError("the rule baseline's scores are labels already (1 = mentioned, "
                                   "0.5 = hedged, 0 = absent or negated); run it without "
                                   "--calibration")
        model = self.model or self.calibration.model
        for condition in self.conditions:
            self.calibration.check_applies(model, self.prompt_hash, condition.name,
                                           condition.definition_hash())

    def labeller(self, calibrate_every_condition: bool = True,
                 remembered_scores: int = DEFAULT_ENTRIES) -> Labeller | rules.RuleLabeller:
        """The labeller of this setup; loads the engine (on an actor or a replica). It keeps
        the scores of up to `remembered_scores` questions (score_cache)."""
        if self.uses_rules:
            return rules.RuleLabeller(list(self.conditions))
        return Labeller(make_engine(self.engine), self.conditions, self.method, self.template,
                        calibration=self.calibration,
                        calibrate_every_condition=calibrate_every_condition,
                        few_shot_pool=self.pool, score_cache=ScoreCache(remembered_scores))
