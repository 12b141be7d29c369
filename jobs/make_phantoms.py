"""Write a synthetic DICOM spine dataset: sagittal T2/T1 and axial series with discs at known
levels, stenosis and vertebral lesions at random, reports, truth labels, disc locations and a
2D image list (the README's imaging example and the imaging tests use it).

    python jobs/make_phantoms.py --output phantoms/ --studies 48
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray_app.imaging.phantoms import PhantomConfig, make_phantom_dataset
from ray_app.pipeline.cli import InputError, run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = config_parser(PhantomConfig, __doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write the dataset into")
    args = parser.parse_args(argv)
    try:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder {args.output}: {err.strerror or err}; "
                         "check --output") from err
    paths = make_phantom_dataset(args.output, config_from_args(PhantomConfig, args))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    run_job(main)
