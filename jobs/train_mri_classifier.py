"""Train an MRI classifier on disc embeddings and report labels: a linear SVM per disc
(--kind disc, level labels, e.g. stenosis) or an NSK-SVM per scan (--kind scan, e.g. cancer),
EER threshold on the validation studies, metrics on the test studies, saved with provenance.

    python jobs/train_mri_classifier.py --embeddings emb/ --labels out/labels \
        --reports reports.csv --condition spinal_cancer --kind scan --output models/cancer
"""

from __future__ import annotations

import json
import logging

from ray_app.imaging.mri_training import TrainClassifierConfig, train_mri_classifier
from ray_app.pipeline.cli import run_job
from ray_app.pipeline.config_cli import config_from_args, config_parser


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = config_parser(TrainClassifierConfig, __doc__.split("\n\n")[0]).parse_args(argv)
    classifier = train_mri_classifier(config_from_args(TrainClassifierConfig, args))
    print(json.dumps({"threshold": classifier.threshold, "metrics": classifier.metrics}, indent=2))


if __name__ == "__main__":
    run_job(main)
