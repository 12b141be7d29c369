"""Embed intervertebral discs of DICOM studies with ResNet18 on Ray: Parquet keyed by study,
series and level (GPU actors where the cluster has GPUs, CPU actors otherwise).

    python jobs/embed_discs.py --dicom archive/ --locations discs.csv --output emb/ \
        --weights resnet18-f37072fd.pth
    ray job submit --working-dir . -- python jobs/embed_discs.py --dicom s3://bucket/mri/ ...
"""

from __future__ import annotations

import logging

from ray_app.imaging.embed_job import EmbedJobConfig, run_embed_job
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_parser(EmbedJobConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    logging.getLogger(__name__).info("%s", run_embed_job(config_from_args(EmbedJobConfig, args)))


if __name__ == "__main__":
    run_job(main)
