"""Model locations: folders, .gguf files, pip-shipped models and chunk joining
(ray_app/engines/model_sources.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ray_app.engines import model_sources
from ray_app.engines.model_sources import (
    PIP_MODELS,
    ModelLocation,
    PipModel,
    resolve_model,
)


def test_folder_path(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    loc = resolve_model(str(folder))
    assert loc == ModelLocation(str(folder), str(folder), None)
    assert loc.path == str(folder)


def test_gguf_file_path(tmp_path):
    gguf = tmp_path / "models" / "tiny.Q4_0.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    loc = resolve_model(str(gguf))
    assert (loc.name, loc.folder, loc.gguf_file) == (str(gguf), str(gguf.parent), "tiny.Q4_0.gguf")
    assert loc.path == str(gguf)


def test_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert resolve_model("~/m").folder == str(tmp_path / "m")


@pytest.mark.parametrize("spec", ["no-such-model-xyz", "weights.bin", "missing/model.gguf"])
def test_unknown_name_lists_pip_models(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")  # a file, but not a .gguf
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "smollm2-135m-instruct" in message and "qwen2.5-coder-1.5b-instruct" in message


def test_pip_model_not_installed_gives_install_hint(monkeypatch):
    fake = PipModel(("ray_app_no_such_pkg_xyz",), "m.gguf", "pip install fake-model==9.9")
    monkeypatch.setitem(PIP_MODELS, "fake-model", fake)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model("fake-model")
    message = str(info.value)
    assert "'ray_app_no_such_pkg_xyz' is not installed" in message
    assert message.endswith("run: pip install fake-model==9.9")


# --- fake pip packages --------------------------------------------------------------------------


def make_package(site: Path, name: str, files: dict[str, bytes]) -> Path:
    package = site / name
    for relative, content in {"__init__.py": b"", **files}.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_bytes(content)
    return package


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(model_sources, "_CACHE", tmp_path / "cache")
    return site


@pytest.fixture
def chunked(site, monkeypatch, request) -> tuple[str, list[Path]]:
    """A model split into two chunk packages, registered under a test-unique name."""
    stem = f"rayapp_fake_{request.node.name.split('[')[0][-20:]}"
    parts = [
        make_package(site, f"{stem}_part1", {"data/part01.bin": b"GGUF-first-half|"}),
        make_package(site, f"{stem}_part2", {"data/part02.bin": b"second-half\x00\xff"}),
    ]
    monkeypatch.setitem(
        PIP_MODELS, "fake-chunked",
        PipModel((f"{stem}_part1", f"{stem}_part2"), "fake.gguf", "pip install fake-parts"),
    )
    return "fake-chunked", parts


def test_single_package_model(site, monkeypatch):
    package = make_package(site, "rayapp_fake_single", {"Fake.Q4.gguf": b"GGUF"})
    model = PipModel(("rayapp_fake_single",), "Fake.Q4.gguf", "x")
    monkeypatch.setitem(PIP_MODELS, "fake-single", model)
    loc = resolve_model("fake-single")
    assert loc == ModelLocation("fake-single", str(package), "Fake.Q4.gguf")
    assert Path(loc.path).read_bytes() == b"GGUF"


def test_chunks_are_joined_into_the_cache(chunked, tmp_path):
    name, _ = chunked
    loc = resolve_model(name)
    target = Path(loc.path)
    assert target.read_bytes() == b"GGUF-first-half|second-half\x00\xff"
    assert target.parent.parent == tmp_path / "cache" / "models"
    assert target.parent.name.startswith("fake-chunked-") and loc.gguf_file == "fake.gguf"
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake.gguf"]  # no .partial left


def test_second_resolve_does_not_rejoin(chunked):
    name, _ = chunked
    first = resolve_model(name)
    target = Path(first.path)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # a stamp a rejoin would overwrite
    before = target.stat().st_mtime_ns
    assert resolve_model(name) == first
    assert target.stat().st_mtime_ns == before == 1_000_000_000


def test_changed_chunk_joins_a_new_file(chunked):
    name, parts = chunked
    first = Path(resolve_model(name).path)
    (parts[1] / "data" / "part02.bin").write_bytes(b"a longer second half")
    second = Path(resolve_model(name).path)
    assert second != first
    assert second.read_bytes() == b"GGUF-first-half|a longer second half"
    assert first.read_bytes() == b"GGUF-first-half|second-half\x00\xff"  # old join left alone


def test_same_size_chunk_change_joins_a_new_file(chunked):
    name, parts = chunked
    resolve_model(name)
    chunk = parts[1] / "data" / "part02.bin"
    new = b"SECOND-HALF\x00\xff"
    assert len(new) == chunk.stat().st_size
    chunk.write_bytes(new)
    os.utime(chunk, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))  # as if reinstalled
    assert Path(resolve_model(name).path).read_bytes() == b"GGUF-first-half|" + new


@pytest.mark.parametrize("files", [{}, {"data/part02.bin": b"a", "data/part03.bin": b"b"}])
def test_chunk_package_must_hold_exactly_one_part(chunked, files):
    name, parts = chunked
    (parts[1] / "data" / "part02.bin").unlink()
    for relative, content in files.items():
        (parts[1] / relative).write_bytes(content)
    with pytest.raises(FileNotFoundError, match=r"model fake-chunked: each chunk package must"):
        resolve_model(name)


def test_missing_chunk_package_names_it(chunked, monkeypatch):
    name, _ = chunked
    model = PIP_MODELS[name]
    monkeypatch.setitem(
        PIP_MODELS, name, PipModel((*model.packages, "rayapp_fake_part3_absent"), "f.gguf", "hint")
    )
    missing = r"'rayapp_fake_part3_absent' is not installed; run: hint"
    with pytest.raises(FileNotFoundError, match=missing):
        resolve_model(name)


def test_real_smollm2_package_resolves():
    try:
        loc = resolve_model("smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 pip package not installed ({err})")
    assert loc.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(loc.path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_loading_is_quiet_inside_and_as_before_after():
    """No progress bars (transformers' own, and the GGUF de-quantizer's tqdm) while loading, in
    engine actors and fine-tuning workers alike; the settings come back afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    from ray_app.engines.model_sources import quiet_loading

    bar = gguf_loading.tqdm
    hf_logging.enable_progress_bar()
    with quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
        assert gguf_loading.tqdm(range(3)).disable
    assert hf_logging.is_progress_bar_enabled() and gguf_loading.tqdm is bar
