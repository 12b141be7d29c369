"""Reports -> labels: conditions, prompts, sections, scoring, the labeller, the rule baseline."""
