"""Fine-tune a 2D CNN (DenseNet121 or ResNet18) on images with report labels on Ray Train:
random rotation and crops, negatives undersampled each epoch, a checkpoint every epoch; rerun
the same command to resume.

    python jobs/train_cnn.py --images images.csv --output runs/ankle --weights densenet121.pth
    ray job submit --working-dir . -- python jobs/train_cnn.py --images ... --workers 4
"""

from __future__ import annotations

import json
import logging

from ray_app.imaging.cnn import CNNConfig
from ray_app.imaging.cnn_train_job import run_cnn_training
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_parser(CNNConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    history = run_cnn_training(config_from_args(CNNConfig, args))
    print(json.dumps(history, indent=2))


if __name__ == "__main__":
    run_job(main)
