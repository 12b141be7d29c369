"""Phantom datasets shared by the imaging tests (small images; written once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_app.imaging.phantoms import PhantomConfig, make_phantom_dataset

# 96 x 96 images over 240 mm (2.5 mm pixels): discs a few pixels high, enough to see stenosis.
SMALL = dict(size=96, fov_mm=240.0, slices=7, noise=0.04)
SMALL_CROP = (3, 24, 48)
SMALL_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """40 studies, with the unusable files."""
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms"), PhantomConfig(studies=40, seed=7, **SMALL))


@pytest.fixture(scope="session")
def few_phantoms(tmp_path_factory) -> dict[str, Path]:
    """4 studies, with the unusable files (Ray job tests)."""
    return make_phantom_dataset(tmp_path_factory.mktemp("few"), PhantomConfig(studies=4, seed=3, **SMALL))
