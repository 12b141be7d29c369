"""ray_app: calibrated labels from free-text radiology reports with a locally run LLM."""

__version__ = "0.1.0"
