"""Calibration and evaluation: thresholds, metrics, evaluation runs and reports, review, prompt selection."""
