"""Sagittal lumbar-spine phantoms drawn in millimetres: vertebral bodies, discs at known levels,
the CSF-filled canal, posterior elements; stenosis (disc bulge into the canal, disc height and
T2 signal loss) and a vertebral lesion at controllable levels. Pure numpy; phantoms.py writes
them as DICOM."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

LEVELS = ("L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
BODIES = ("L1", "L2", "L3", "L4", "L5", "S1")

# Signal per tissue for each contrast (fractions of full scale).
CONTRASTS = {
    "T2": {"background": 0.12, "posterior": 0.30, "body": 0.45, "nucleus": 0.85, "annulus": 0.30,
           "csf": 0.95, "lesion": 0.10},
    "T1": {"background": 0.55, "posterior": 0.45, "body": 0.65, "nucleus": 0.35, "annulus": 0.30,
           "csf": 0.15, "lesion": 0.20},
}


@dataclass
class SpineAnatomy:
    """One patient's lumbar spine; every length in mm. Rows of an image run head to foot (z),
    columns anterior to posterior (y); slices are left-right offsets (x) from the midline."""

    top_mm: float
    ap_centre_mm: float
    lordosis_mm: float
    body_heights: list[float]
    disc_heights: list[float]
    stenosis: dict[str, float] = field(default_factory=dict)  # level -> severity in [0, 1]
    lesion_body: str | None = None
    lesion_radius_mm: float = 7.0
    lesion_offset: tuple[float, float] = (0.0, 0.0)  # (ap, lateral) from the body centre
    body_depth_mm: float = 34.0
    canal_mm: float = 14.0
    half_width_mm: float = 22.0
    canal_half_width_mm: float = 10.0

    def disc_centres(self) -> dict[str, tuple[float, float]]:
        """(z, y) in mm of each disc's centre in the midline slice."""
        centres, z = {}, self.top_mm
        for i, level in enumerate(LEVELS):
            z += self.body_heights[i]
            height = self._disc_height(level)
            centres[level] = (z + height / 2, self.ap_at(z + height / 2))
            z += height
        return centres

    def ap_at(self, z: np.ndarray | float) -> np.ndarray | float:
        """Anterior edge of the vertebral column at height z (a gentle lordotic curve)."""
        return self.ap_centre_mm - self.lordosis_mm * np.sin(np.pi * (z - self.top_mm) / 180.0)

    def _disc_height(self, level: str) -> float:
        severity = self.stenosis.get(level, 0.0)
        return self.disc_heights[LEVELS.index(level)] * (1.0 - 0.35 * severity)

    def segments(self) -> list[tuple[str, str, float, float]]:
        """(kind, name, z_top, z_bottom) of bodies and discs from top to bottom."""
        out, z = [], self.top_mm
        for i, body in enumerate(BODIES):
            out.append(("body", body, z, z + self.body_heights[i]))
            z += self.body_heights[i]
            if i < len(LEVELS):
                height = self._disc_height(LEVELS[i])
                out.append(("disc", LEVELS[i], z, z + height))
                z += height
        return out


def random_anatomy(rng: np.random.Generator, fov_mm: float, stenosis_rate: float,
                   lesion_rate: float) -> SpineAnatomy:
    """A plausible spine placed in the field of view, with random findings."""
    bodies = list(rng.uniform(23, 29, len(BODIES)))
    discs = list(rng.uniform(8.5, 11.5, len(LEVELS)))
    length = sum(bodies) + sum(discs)
    # Lower levels degenerate more often, as in real lumbar spines.
    weights = np.array([0.5, 0.7, 1.0, 1.5, 1.3])
    stenosis = {lvl: float(rng.uniform(0.55, 1.0)) for lvl, w in zip(LEVELS, weights)
                if rng.random() < min(0.95, stenosis_rate * w)}
    stenosis.update({lvl: float(rng.uniform(0.0, 0.45)) for lvl in LEVELS if lvl not in stenosis})
    lesion = str(rng.choice(BODIES[:5])) if rng.random() < lesion_rate else None
    return SpineAnatomy(
        top_mm=float(rng.uniform(0.08, 0.92) * (fov_mm - length)),
        ap_centre_mm=float(rng.uniform(0.30, 0.40) * fov_mm),
        lordosis_mm=float(rng.uniform(2, 10)),
        body_heights=bodies, disc_heights=discs, stenosis=stenosis, lesion_body=lesion,
        lesion_radius_mm=float(rng.uniform(6, 9)),
        lesion_offset=(float(rng.uniform(-5, 5)), float(rng.uniform(-4, 4))),
    )


def render_slice(anatomy: SpineAnatomy, lateral_mm: float, shape: tuple[int, int],
                 spacing_mm: float, contrast: str, rng: np.random.Generator,
                 noise: float = 0.04) -> np.ndarray:
    """Signal in [0, ~1] of one sagittal slice `lateral_mm` from the midline."""
    tissue = CONTRASTS[contrast]
    z, y = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32) * spacing_mm
    image = np.full(shape, tissue["background"], np.float32)
    front = anatomy.ap_at(z)
    back = front + anatomy.body_depth_mm
    inside = abs(lateral_mm) < anatomy.half_width_mm
    in_canal_plane = abs(lateral_mm) < anatomy.canal_half_width_mm
    column = (z >= anatomy.top_mm) & (z < anatomy.segments()[-1][3] + 15)
    if inside:
        posterior = column & (y >= back) & (y < back + anatomy.canal_mm + 22)
        image[posterior] = tissue["posterior"]
    if in_canal_plane:
        canal = column & (y >= back) & (y < back + anatomy.canal_mm)
        image[canal] = tissue["csf"]
    if inside:
        for kind, name, top, bottom in anatomy.segments():
            _draw_segment(image, tissue, anatomy, kind, name, (top, bottom), (z, y, front, back),
                          in_canal_plane)
        _draw_lesion(image, tissue, anatomy, lateral_mm, z, y)
    image = gaussian_filter(image, sigma=max(0.5, 1.0 / spacing_mm))
    return image + rng.normal(0.0, noise, shape).astype(np.float32)


def _draw_segment(image, tissue, anatomy: SpineAnatomy, kind: str, name: str,
                  z_range: tuple[float, float], grid, in_canal_plane: bool) -> None:
    z, y, front, back = grid
    rows = (z >= z_range[0]) & (z < z_range[1])
    if kind == "body":
        image[rows & (y >= front) & (y < back)] = tissue["body"]
        return
    severity = anatomy.stenosis.get(name, 0.0)
    bulge = severity * 0.75 * anatomy.canal_mm if in_canal_plane else 0.0
    image[rows & (y >= front) & (y < back + bulge)] = tissue["annulus"]
    nucleus = (1 - severity) * tissue["nucleus"] + severity * tissue["annulus"] * 1.2
    core = rows & (y >= front + 7) & (y < back - 7)
    image[core] = nucleus


def _draw_lesion(image, tissue, anatomy: SpineAnatomy, lateral_mm: float, z, y) -> None:
    if anatomy.lesion_body is None:
        return
    top, bottom = next((t, b) for k, n, t, b in anatomy.segments() if n == anatomy.lesion_body)
    cz = (top + bottom) / 2
    cy = anatomy.ap_at(cz) + anatomy.body_depth_mm / 2 + anatomy.lesion_offset[0]
    r2 = anatomy.lesion_radius_mm ** 2 - (lateral_mm - anatomy.lesion_offset[1]) ** 2
    if r2 > 0:
        image[(z - cz) ** 2 + (y - cy) ** 2 < r2] = tissue["lesion"]
